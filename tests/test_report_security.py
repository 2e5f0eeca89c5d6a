"""Safe to open: a results file written by someone else cannot put script, links or broken tables into the report.

Every string field of the points and of the manifest carries an injection payload; the report is rendered
through the CLI and report.html is parsed (html.parser) for script elements, event-handler attributes and
javascript: URLs; report.md is rendered the way a permissive viewer would (raw HTML on) and checked the same.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fixtures.results import H100, make_point
from typer.testing import CliRunner

from falqon_bench.cli import app
from falqon_bench.data.identity import (
    KNOWN_LAYER_SHAPES,
    KNOWN_METHODS,
    KNOWN_MODELS,
    WARNING_SIGN,
    layer_problem,
    method_problem,
)
from falqon_bench.readers.safe_markup import content_security_policy, md_text
from falqon_bench.data.schema import SCHEMA_VERSION
from falqon_bench.data.store import MANIFEST, POINTS

SCRIPT = '<script>alert("x")</script><img src=x onerror=alert(1)>'
PAYLOADS = [
    SCRIPT,
    "javascript:alert(1)",
    '"><svg onload=alert(1)>',
    "[x](javascript:alert(1))",
    "![i](javascript:alert(4))",
    "a | b | c",
    "`code` ``x``",
    "line one\n<script>alert(5)</script>\n| broken | row |",
    "falqon<b onmouseover=alert(2)>",
    '<a href="javascript:alert(3)">link</a>',
    "&lt;script&gt;alert(6)&lt;/script&gt;",
    "<https://example.com/x>",
    "$\\frac{$ *em* _em_ ~~del~~ # head",
]
# markup any payload tries to smuggle in, none of which may stand unescaped in report.md
DANGEROUS = [r"<script", r"<img", r"<svg", r"<b ", r"<a ", r"(?<!\\)\]\(javascript:", r"<https:"]


# layer names are payloads too, but only two of them: each distinct layer is one more panel in each figure
LAYER_PAYLOADS = (SCRIPT, PAYLOADS[7])


def _payload(i: int) -> str:
    return PAYLOADS[i % len(PAYLOADS)]


class _Elements(HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k.lower(): (v or "") for k, v in attrs}))

    handle_startendtag = handle_starttag

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Elements:
    parser = _Elements()
    parser.feed(page)
    parser.close()
    return parser


def assert_inert(page: str) -> _Elements:
    """No script element, no on* attribute, no javascript:/vbscript: URL in any attribute."""
    parsed = _parse(page)
    assert not [t for t, _ in parsed.tags if t in ("script", "iframe", "object", "embed", "svg", "base", "form")]
    for tag, attrs in parsed.tags:
        assert not [k for k in attrs if k.startswith("on")], (tag, attrs)
        for key, value in attrs.items():
            squashed = re.sub(r"[\s\x00-\x1f]+", "", value).lower()
            assert not squashed.startswith(("javascript:", "vbscript:")), (tag, key, value)
    return parsed


def _points(device: str, payload_at: int) -> list[dict]:
    """Ok points of known methods (so every figure has bars), plus rows whose every string is a payload."""
    points = []
    for method, ms in (("bf16_lora", 1.0), ("falqon", 0.7)):
        for layer, (K, N) in (("llama-7b.attn", (4096, 4096)), ("llama-7b.up", (4096, 11008))):
            for rank in (16, 64):
                points.append(make_point(method, layer, rank, device=device, K=K, N=N, gpu_samples=[ms * (1 + 0.01 * i) for i in range(6)],
                                         wall_samples=[3 * ms] * 6, kernel_ms={"gemm_bf16": 0.6 * ms, "quantize": 0.3 * ms},
                                         floor_ms=0.5 * ms))
    for j in range(len(PAYLOADS)):
        k = payload_at + j
        ok = make_point(_payload(k), LAYER_PAYLOADS[j % 2], 16, device=device, gpu_samples=[0.9] * 6, wall_samples=[2.0] * 6,
                        kernel_ms={"gemm_bf16": 0.5, _payload(k + 2): 0.3}, floor_ms=0.4)
        failed = make_point(_payload(k + 3), "llama-7b.attn", 64, device=device, status="error", error=_payload(k + 4))
        odd_status = make_point("falqon", LAYER_PAYLOADS[j % 2], 64, device=device, status=_payload(k + 6), error=_payload(k + 7))
        for n, p in enumerate((ok, failed, odd_status) if j % 3 == 0 else (ok,)):
            p.update(suite=_payload(k + n), cache=_payload(k + n + 1), dtype=_payload(k + n + 2), gpu_timing=_payload(k + n + 3),
                     options={_payload(k + n + 4): _payload(k + n + 5)}, point_id=f"{_payload(k + n)}-{k}-{n}",
                     **{_payload(k + n + 6): _payload(k + n + 7)})
            points.append(p)
    return points


def _manifest(run_id: str, device: str) -> dict:
    return {
        "run_id": run_id,
        "suite": SCRIPT,
        "git_sha": _payload(1),
        "dirty": _payload(2),
        "status": _payload(3),
        SCRIPT: _payload(4),
        "options": {_payload(5): _payload(6)},
        "env": {"device": device, "versions": {"torch": _payload(7), "triton": _payload(8), _payload(9): _payload(10)},
                "git": {"sha": _payload(11), "dirty": _payload(12)}, "hostname": _payload(0)},
    }


def _write(run_dir: Path, manifest: dict, points: list[dict]) -> Path:
    """The files as a hostile author writes them: by hand (RunWriter refuses a status outside RUN_STATUSES)."""
    run_dir.mkdir(parents=True)
    (run_dir / MANIFEST).write_text(json.dumps({"schema": SCHEMA_VERSION, **manifest}, default=str))
    (run_dir / POINTS).write_text("".join(json.dumps(p, sort_keys=True, default=str) + "\n" for p in points))
    return run_dir


@pytest.fixture(scope="module")
def poisoned_report(tmp_path_factory):
    """Two runs (two GPU names, so Fig. 5 renders too): one with a payload as its GPU name, both with
    payloads in every string of the manifest and of their odd rows; rendered by `falqon-bench report`."""
    root = tmp_path_factory.mktemp("poisoned")
    a = _write(root / "a", _manifest(PAYLOADS[2], SCRIPT), _points(SCRIPT, 0))
    b = _write(root / "b", _manifest(PAYLOADS[3], H100), _points(H100, 5))
    out = root / "report"
    result = CliRunner().invoke(app, ["report", str(a), str(b), "--out", str(out)])
    return result, out


def test_poisoned_results_render_with_exit_0_and_every_page(poisoned_report):
    result, out = poisoned_report
    assert result.exit_code == 0, result.output
    for name in ("report.html", "report.md", "perf_table.md", "fig1_overhead.png", "fig5_gpus.png", "floor.png"):
        assert (out / name).stat().st_size > 0, name


def test_report_html_has_no_script_no_handler_no_javascript_url_and_a_strict_csp(poisoned_report):
    _, out = poisoned_report
    page = (out / "report.html").read_text(encoding="utf-8")
    parsed = assert_inert(page)
    csp = [a["content"] for t, a in parsed.tags if t == "meta" and a.get("http-equiv", "").lower() == "content-security-policy"]
    assert len(csp) == 1
    policy = {d.split()[0]: d.split()[1:] for d in csp[0].split(";") if d.strip()}
    assert policy["default-src"] == ["'none'"] and policy["img-src"] == ["data:"]
    assert "script-src" not in policy and "'unsafe-inline'" not in csp[0]
    assert policy["style-src"][0].startswith("'sha256-")
    # the page still renders: every figure inlined, the tables there, the payloads shown as text
    images = [a["src"] for t, a in parsed.tags if t == "img"]
    figures = sorted(p.name for p in out.glob("*.png"))
    assert len(figures) >= 6 and len(images) == len(figures), (figures, len(images))
    assert all(s.startswith("data:image/png;base64,") for s in images)
    assert sum(t == "table" for t, _ in parsed.tags) >= 4
    text = "".join(parsed.text)
    assert SCRIPT in text and "[x](javascript:alert(1))" in text
    assert not [a for t, a in parsed.tags if t == "a"], "no value may become a link"


def test_style_attributes_are_gone_so_the_csp_hash_covers_every_style(poisoned_report):
    _, out = poisoned_report
    page = (out / "report.html").read_text(encoding="utf-8")
    assert not [a for _, a in _parse(page).tags if "style" in a]
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    assert content_security_policy(style) in page


def test_report_md_holds_no_payload_unescaped_and_renders_inert_with_raw_html_on(poisoned_report):
    from markdown_it import MarkdownIt

    _, out = poisoned_report
    for name in ("report.md", "perf_table.md"):
        md = (out / name).read_text(encoding="utf-8")
        for bad in DANGEROUS:
            assert not re.search(bad, md), (name, bad)
        for payload in PAYLOADS:
            if md_text(payload) != payload:  # plain text such as 'javascript:alert(1)' may stay as it is
                assert payload not in md, (name, payload)
        # a permissive viewer (raw HTML on, as on a code host before its sanitizer) still gets no active markup
        assert_inert(MarkdownIt("commonmark", {"html": True}).enable("table").render(md))


def test_no_value_can_add_or_remove_a_table_column(poisoned_report):
    _, out = poisoned_report
    md = (out / "report.md").read_text(encoding="utf-8")
    pipes = lambda line: len(re.findall(r"(?<!\\)\|", line))  # noqa: E731
    tables = re.findall(r"(?m)^(\|.*\|)\n(\|[-:|]+\|)\n((?:\|.*\n)*)", md)
    assert len(tables) >= 4
    for header, rule, body in tables:
        for row in body.splitlines():
            assert pipes(row) == pipes(header), row


def test_unknown_and_invalid_names_are_shown_escaped_and_marked(poisoned_report):
    _, out = poisoned_report
    table = (out / "perf_table.md").read_text(encoding="utf-8")
    md = (out / "report.md").read_text(encoding="utf-8")
    # the variant label is the method with the point's (hostile) options in brackets: all escaped, then marked
    rows = [line for line in table.splitlines() if f"| {md_text(PAYLOADS[8])}\\[" in line]
    assert rows and all(f"] {WARNING_SIGN} invalid method name" in line for line in rows), rows
    assert re.search(rf"\| llama-7b\.attn \| \d+ \| 4096 \| falqon \| [\d.]+ \(", table), "known rows stay unmarked"
    check = md.split("## Method and layer names")[1]
    assert check.count(WARNING_SIGN) >= len(PAYLOADS) and "invalid layer name" in check
    assert not [line for line in check.splitlines() if "`bf16_lora`" in line or "`falqon`, layer `llama" in line]


def test_a_known_layer_name_with_another_shape_is_marked(tmp_path):
    from falqon_bench.readers.figures.data import points_table
    from falqon_bench.readers.report import identity_check, perf_table
    from falqon_bench.data.store import load_run

    points = [make_point("bf16_lora", "llama-7b.up", 16, gpu_samples=[1.0] * 5, K=4096, N=11008),
              make_point("falqon", "llama-7b.up", 16, gpu_samples=[0.5] * 5, K=64, N=64)]
    df = points_table([load_run(_write(tmp_path / "r", _manifest("r", H100), points))])
    table = perf_table(df)
    assert re.search(r"\| llama-7b\.up \| 16 \| 4096 \| bf16_lora \| 1 \(", table), table
    assert f"| llama-7b.up {WARNING_SIGN} K×N 64×64 is not the shape of llama-7b.up (4096×11008) | 16 | 4096 | falqon |" in table
    assert identity_check(df).count(WARNING_SIGN) == 1


def test_identity_marks_unknown_methods_bad_names_and_shapes_that_do_not_match_their_name():
    assert method_problem("falqon") is None and method_problem("my_method") == "unknown method"
    assert method_problem("falqon<b>") == "invalid method name" and method_problem(None) == "invalid method name"
    assert method_problem("x" * 200) == "invalid method name"
    assert layer_problem("llama-7b.attn", 4096, 4096) is None and layer_problem("tiny.64x64", 64, 64) is None
    assert layer_problem("custom.64x96", 64, 96) is None and layer_problem("custom.64x96", 64, 64).startswith("K×N 64×64")
    assert layer_problem("llama-7b.attn", 64, 64) == "K×N 64×64 is not the shape of llama-7b.attn (4096×4096)"
    assert layer_problem("small-llama") is None and layer_problem("/data/models/llama") is None  # e2e points
    assert layer_problem("a b") == layer_problem("x|y") == layer_problem("") == "invalid layer name"
    assert method_problem("kernel.melded_gemm.triton") is None and layer_problem("4096x4096", 4096, 4096) is None


@pytest.mark.parametrize("key, value", [("rank", SCRIPT), ("K", "4096"), ("tokens", None), ("N", True), ("compile", "<b>")])
def test_a_shape_key_that_is_not_an_integer_is_a_clear_input_error(tmp_path, key, value):
    points = _points(H100, 0)[:3]
    points[1][key] = value
    run_dir = _write(tmp_path / "r", _manifest("r", H100), points)
    result = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and result.exception is not None and "Traceback" not in result.output
    assert f"points.jsonl: point 2 has `{key}` = " in " ".join(result.output.split())
    assert not (tmp_path / "out" / "report.html").exists()


def test_md_text_renders_back_to_the_same_text_in_one_table_cell():
    from markdown_it import MarkdownIt

    for payload in PAYLOADS + ["bf16_lora", "_x_", "a\\|b", "**", "\\", "a\u2028b"]:
        html = MarkdownIt("commonmark", {"html": True}).enable("table").render(f"| h |\n|---|\n| {md_text(payload)} |\n")
        parsed = assert_inert(html)
        assert [t for t, _ in parsed.tags].count("td") == 1, payload
        cell = re.search(r"<td>(.*)</td>", html, re.S).group(1)
        assert "".join(_parse(cell).text) == re.sub(r"[\x00-\x1f\u2028]", " ", payload), payload
    assert md_text("fp8_lora") == "fp8_lora" and md_text("llama-7b.attn") == "llama-7b.attn"


def test_a_run_id_that_climbs_out_of_reports_stays_inside_it(tmp_path, monkeypatch):
    from falqon_bench.readers.report import _report_name, render_report
    from falqon_bench.data.store import RunData

    monkeypatch.chdir(tmp_path)
    run_dir = _write(tmp_path / "results" / "r", _manifest("../../escape", "CPU"), _points("CPU", 0)[:8])
    out = render_report([run_dir])
    assert out.parent == Path("reports") and (tmp_path / out / "report.html").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports", "results"]
    for run_id in ("..", ".", "/abs/path", "../..", "x" * 400, "a/../../b"):
        name = _report_name([RunData(tmp_path, {"run_id": run_id}, [])])
        assert "/" not in name and name not in ("", ".", "..") and not name.startswith(".") and len(name) <= 120, name


def test_known_names_match_the_method_registry_and_the_layer_tables():
    """identity.py is torch-free, so it holds copies: they must equal what the code registers."""
    from falqon_bench.suites.layers import named_layers
    from falqon_bench.suites.models import MODEL_NAMES
    from falqon_core.methods import get_method, method_names

    # the project's own methods (tests register throwaway ones from tests/fixtures into the same registry)
    shipped = {n for n in method_names() if type(get_method(n)).__module__.startswith("falqon_core.methods.")}
    assert set(KNOWN_METHODS) == shipped
    assert KNOWN_LAYER_SHAPES == {name: (s.K, s.N) for name, s in named_layers().items()}
    assert set(KNOWN_MODELS) == set(MODEL_NAMES)


def test_the_name_checks_and_the_escaping_import_no_torch():
    code = ("import json, sys, falqon_bench.data.identity, falqon_bench.readers.safe_markup; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'falqon_core'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
