"""The web view in headless Chromium against a real mboxd (MBOX_WEB_MOCK=1: the mock):
the experiment list, a run's charts, comparison, live updates, and that text from
users never runs as markup. Each test leaves a screenshot (see conftest.py)."""

import threading
import time
import uuid

import pytest

from webtest import now_ms

XSS_NAME = "<img src=x onerror=alert(1)>"


def ns(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def steps_values(n, start=0, f=lambda i: 1.0 / (1 + i)):
    return list(range(start, start + n)), [f(i) for i in range(start, start + n)]


def test_experiment_list_shows_the_runs(backend, tab):
    space = ns("list")
    ids = {}
    for i, name in enumerate(["alpha-run", "beta-run", "gamma-run"]):
        ids[name] = backend.create(name, namespace=space, owner=f"owner{i}@example.com", metadata={"lr": 0.001 * (i + 1)})
        time.sleep(0.005)
    steps, values = steps_values(250)
    backend.log(ids["beta-run"], "train/loss", steps, values)

    page = tab.open(f"/?namespace={space}")
    rows = page.eval_on_selector_all(
        "table.experiments tbody tr[data-id]",
        "rows => rows.map(r => [r.dataset.id, r.querySelector('.name a').textContent, r.querySelector('.owner').textContent,"
        " r.querySelector('.activity').dataset.points, r.querySelector('.name a').getAttribute('href')])")
    # Newest first: the default order.
    assert [r[1] for r in rows] == ["gamma-run", "beta-run", "alpha-run"]
    assert {r[0] for r in rows} == set(ids.values())
    by_name = {r[1]: r for r in rows}
    assert by_name["alpha-run"][2] == "owner0@example.com"
    assert by_name["beta-run"][3] == "250"  # points in the last minute
    assert by_name["alpha-run"][3] == "0"
    assert by_name["beta-run"][4] == f"/experiments/{ids['beta-run']}"

    # The sort: oldest first.
    page.select_option("select[name=order]", "created_at ASC")
    page.wait_for_function("document.querySelector('table.experiments tbody tr .name a').textContent === 'alpha-run'")

    # The search box builds `name ~ "..."`.
    page.fill("input[name=q]", "gamma")
    page.wait_for_function("document.querySelectorAll('table.experiments tbody tr[data-id]').length === 1")
    assert page.inner_text("table.experiments tbody tr .name a") == "gamma-run"
    assert "q=gamma" in page.url

    # The advanced filter; a bad one says what is wrong and keeps the rows.
    page.fill("input[name=q]", "")
    page.fill("input[name=filter]", "params.lr > 0.0015")
    page.press("input[name=filter]", "Enter")
    page.wait_for_function("document.querySelectorAll('table.experiments tbody tr[data-id]').length === 2")
    page.fill("input[name=filter]", "params.lr >>> 1")
    page.press("input[name=filter]", "Enter")
    page.wait_for_selector(".filter-error:not([hidden])")
    assert page.inner_text(".filter-error").startswith("filter:")
    assert page.eval_on_selector_all("table.experiments tbody tr[data-id]", "r => r.length") == 2

    # Ticking two runs and Compare opens /compare?ids=...
    page.fill("input[name=filter]", "")
    page.press("input[name=filter]", "Enter")
    page.wait_for_function("document.querySelectorAll('table.experiments tbody tr[data-id]').length === 3")
    page.check(f"tr[data-id='{ids['alpha-run']}'] input.select")
    page.check(f"tr[data-id='{ids['gamma-run']}'] input.select")
    assert page.inner_text("button.compare-btn") == "Compare (2)"
    page.click("button.compare-btn")
    page.wait_for_url("**/compare?ids=*")
    assert sorted(page.url.split("ids=")[1].split(",")) == sorted([ids["alpha-run"], ids["gamma-run"]])
    page.wait_for_selector("html[data-ready=true]")


def test_run_page_draws_one_chart_per_key(backend, tab):
    space = ns("run")
    eid = backend.create("charts", namespace=space, metadata={"lr": 0.0003, "optimizer": "adamw", "model": {"depth": 50}})
    t0 = now_ms() - 100_000
    n = 5000
    steps, values = steps_values(n)
    wall = [t0 + 10 * s for s in steps]
    backend.log(eid, "train/loss", steps, values, wall)
    backend.log(eid, "train/acc", steps, [1 - v for v in values], wall)
    backend.log(eid, "val/loss", steps[::100], values[::100], wall[::100])
    backend.log(eid, "system/gpu_util", steps[::10], [50.0 + (s % 7) for s in steps[::10]], wall[::10])
    backend.log(eid, "lr", steps, [0.0003] * n, wall)
    backend.log_events(eid, [{"name": "checkpoint", "source": "trainer", "wallclock": t0 + 10 * 1000, "metadata": {"step": 1000}},
                             {"name": "eval", "source": "evaluator", "wallclock": t0 + 10 * 3000}])

    page = tab.open(f"/experiments/{eid}")
    charts = tab.charts()
    assert sorted(charts) == ["lr", "system/gpu_util", "train/acc", "train/loss", "val/loss"]
    assert all(c["series"] == "1" for c in charts.values())
    # Grouped by prefix.
    groups = page.eval_on_selector_all(
        ".chart-group", "gs => gs.map(g => [g.dataset.group, [...g.querySelectorAll('.chart-card')].map(c => c.dataset.key)])")
    assert groups == [["", ["lr"]], ["system", ["system/gpu_util"]], ["train", ["train/acc", "train/loss"]], ["val", ["val/loss"]]]
    # 5000 points do not fit a chart's width: bucketed, with a min/max band (uPlot
    # series: x, the line, min, max); 50 points come exact.
    assert charts["train/loss"]["bucketed"] == "true"
    assert 100 < int(charts["train/loss"]["points"]) <= 1400
    assert charts["val/loss"] == {**charts["val/loss"], "bucketed": "false", "points": "50", "lastStep": "4900"}
    uplot_series = page.evaluate("Object.fromEntries(window.__mboxCharts.map(c => [c.key, c.u.series.length]))")
    assert uplot_series == {"lr": 4, "system/gpu_util": 2, "train/acc": 4, "train/loss": 4, "val/loss": 2}
    # Hyperparameters, events on the timeline, in the table and as markers.
    params = page.eval_on_selector_all("table.params tbody tr", "rs => rs.map(r => [...r.cells].map(c => c.textContent))")
    assert params == [["lr", "0.0003"], ["model.depth", "50"], ["optimizer", "adamw"]]
    assert page.eval_on_selector_all("table.events tbody tr td.name", "c => c.map(x => x.textContent)") == ["checkpoint", "eval"]
    assert page.eval_on_selector_all(".timeline .tick", "t => t.length") == 2
    assert page.eval_on_selector_all(".chart-card[data-key='train/loss'] .marker", "m => m.map(x => x.dataset.event)") == ["checkpoint", "eval"]

    # Drag-select zoom asks the server for that step range: exact points appear.
    over = page.locator(".chart-card[data-key='train/loss'] .u-over")
    over.scroll_into_view_if_needed()
    box = over.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.40, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.45, y, steps=5)
    page.mouse.up()
    page.wait_for_function(
        "(() => { const d = document.querySelector(\".chart-card[data-key='train/loss']\").dataset;"
        " return d.zoomed === 'true' && d.bucketed === 'false'; })()")
    zoomed = tab.charts()["train/loss"]
    assert 150 < int(zoomed["points"]) < 350  # about 5% of 5000 steps, every point
    # Double-click resets to the whole run.
    over.dblclick()
    page.wait_for_function("document.querySelector(\".chart-card[data-key='train/loss']\").dataset.zoomed === 'false'")
    assert tab.charts()["train/loss"]["bucketed"] == "true"

    # The other x axes and the log scale redraw without errors.
    for mode in ("wallclock", "relative", "step"):
        page.select_option("select[name=x-axis]", mode)
    page.check("input[name=log]")
    page.fill("input[name=smoothing]", "0.9")
    page.dispatch_event("input[name=smoothing]", "input")
    page.uncheck("input[name=log]")
    page.fill("input[name=smoothing]", "0")
    page.dispatch_event("input[name=smoothing]", "input")
    assert tab.errors == []


def test_compare_overlays_two_runs(backend, tab):
    space = ns("cmp")
    a = backend.create("run-a", namespace=space, metadata={"lr": 0.001, "batch": 64, "only_a": "x"})
    b = backend.create("run-b", namespace=space, metadata={"lr": 0.0003, "batch": 64})
    for eid, scale in ((a, 1.0), (b, 2.0)):
        steps, values = steps_values(300, f=lambda i, s=scale: s / (1 + i))
        backend.log(eid, "train/loss", steps, values)
        backend.log(eid, "val/loss", steps[::30], values[::30])
    backend.log(b, "train/grad_norm", range(100), [1.0] * 100)

    page = tab.open(f"/compare?ids={a},{b}")
    charts = tab.charts()
    assert {k: c["series"] for k, c in charts.items()} == {"train/loss": "2", "val/loss": "2", "train/grad_norm": "1"}
    legend = page.evaluate(
        "window.__mboxCharts.find(c => c.key === 'train/loss').u.series.slice(1).map(s => s.label)")
    assert legend == ["run-a", "run-b"]
    # The hyperparameters that differ; equal ones only on request.
    diff = page.eval_on_selector_all("table.params-diff tbody tr", "rs => rs.map(r => [...r.cells].map(c => c.textContent))")
    assert diff == [["lr", "0.001", "0.0003"], ["only_a", "x", "—"]]
    page.check("input[name=show-all]")
    assert page.eval_on_selector_all("table.params-diff tbody tr", "rs => rs.map(r => r.dataset.key)") == ["batch", "lr", "only_a"]
    assert tab.errors == []


def test_a_run_that_keeps_logging_shows_new_points_within_2s(backend, tab):
    eid = backend.create("live", namespace=ns("live"))
    steps, values = steps_values(200)
    backend.log(eid, "train/loss", steps, values)
    backend.log(eid, "train/acc", steps, values)
    acked = {"step": 199}
    stop = threading.Event()

    def trainer():
        step = 200
        while not stop.is_set():
            backend.log(eid, "train/loss", range(step, step + 10), [0.5] * 10)
            backend.log(eid, "train/acc", range(step, step + 10), [0.5] * 10)
            acked["step"] = step + 9
            step += 10
            time.sleep(0.1)

    thread = threading.Thread(target=trainer, daemon=True)
    thread.start()
    try:
        page = tab.open(f"/experiments/{eid}")
        lags = []
        for _ in range(3):
            target = acked["step"]  # acknowledged by the server before this instant
            t = time.monotonic()
            page.wait_for_function(
                f"[...document.querySelectorAll('.chart-card')].every(c => Number(c.dataset.lastStep) >= {target})",
                timeout=5000)
            lags.append(time.monotonic() - t)
            time.sleep(0.3)
        assert max(lags) < 2.0, lags
        assert page.inner_text(".activity-badge").startswith("live")
    finally:
        stop.set()
        thread.join()
    assert tab.errors == []


def test_html_from_users_renders_as_text(backend, tab):
    # Any script that runs sets window.__xss (the `alert` ones open a dialog, which
    # the tab fixture fails on).
    tab.page.add_init_script("window.__xss = 0;")
    space = ns("xss")
    evil = {
        "note": '<img src=x onerror="window.__xss=1">',
        "script": "<script>window.__xss=2</script>",
        "<b onmouseover=alert(5)>key</b>": '"><svg onload=alert(6)>',
    }
    a = backend.create(XSS_NAME, namespace=space, owner='<a href="javascript:alert(7)">me</a>', metadata=evil)
    b = backend.create("plain", namespace=space, metadata={"note": "plain"})
    key = "html/<img src=x onerror=alert(3)>"
    for eid in (a, b):
        backend.log(eid, key, range(10), [float(i) for i in range(10)])
    backend.log_events(a, [{"name": '<img src=x onerror="window.__xss=4">', "source": "<i>src</i>",
                            "metadata": {"m": "<script>window.__xss=8</script>"}}])

    def assert_inert(page):
        assert page.evaluate("window.__xss") == 0
        assert page.evaluate("document.querySelectorAll('main img, main script, main svg[onload], [onerror], [onload], [onmouseover]').length") == 0

    page = tab.open(f"/?namespace={space}")
    assert page.inner_text(f"tr[data-id='{a}'] .name a") == XSS_NAME
    assert page.inner_text(f"tr[data-id='{a}'] .owner") == '<a href="javascript:alert(7)">me</a>'
    assert_inert(page)

    page = tab.open(f"/experiments/{a}")
    assert page.inner_text(".run-name") == XSS_NAME
    cells = dict(page.eval_on_selector_all("table.params tbody tr", "rs => rs.map(r => [r.cells[0].textContent, r.cells[1].textContent])"))
    assert cells == evil
    assert page.inner_text("table.events tbody td.name") == '<img src=x onerror="window.__xss=4">'
    assert page.inner_text(".chart-card .chart-title") == key
    page.hover(".chart-card .u-over")
    assert_inert(page)

    page = tab.open(f"/compare?ids={a},{b}")
    assert page.inner_text(".run-legend li:first-child a") == XSS_NAME
    assert page.evaluate("window.__mboxCharts[0].u.series[1].label") == XSS_NAME
    page.check("input[name=show-all]")
    assert_inert(page)
    assert tab.errors == []


def test_health_page_polls_and_draws(backend, tab):
    page = tab.open("/health")
    fields = page.eval_on_selector_all(".chart-card[data-key]", "cs => cs.map(c => c.dataset.key)")
    assert "points_accepted_total" in fields and "buffered_bytes" in fields and "spool_bytes" in fields
    before = page.inner_text(".card[data-field=points_accepted_total] .value")
    eid = backend.create("health", namespace=ns("health"))
    backend.log(eid, "k", range(1000), [1.0] * 1000)
    page.wait_for_function("Number(document.querySelector('.chart-card[data-key=points_accepted_total]').dataset.samples) >= 2",
                           timeout=6000)
    page.wait_for_function(
        f"document.querySelector('.card[data-field=points_accepted_total] .value').textContent !== {before!r}", timeout=6000)
    assert tab.errors == []


def test_401_asks_for_a_token(tmp_path, browser):
    """A server that wants a bearer token: the page asks for one, then sends it.
    mboxd with [auth] on and no loopback exemption (the browser is on loopback), or
    the mock with MBOX_WEB_MOCK=1."""
    import os

    from harness import Mboxd, free_port
    from webtest import SCREENSHOTS, wait_http
    from mock_server import MockServer

    if os.environ.get("MBOX_WEB_MOCK") == "1":
        server = MockServer(token="s3cret").start()
        base_url, stop = server.base_url, server.stop
    else:
        config = tmp_path / "mboxd.toml"
        config.write_text('[auth]\nenabled = true\nallow_unauthenticated_loopback = false\n'
                          '[[auth.tokens]]\ntoken = "s3cret"\nscopes = ["read"]\nnamespaces = ["*"]\n')
        port = free_port()
        server = Mboxd(tmp_path / "data", ["--config", str(config)], metrics_listen=f"127.0.0.1:{port}")
        base_url = f"http://127.0.0.1:{port}"
        wait_http(base_url)
        stop = server.stop
    try:
        context = browser.new_context(bypass_csp=True)
        page = context.new_page()
        page.goto(base_url + "/")
        page.wait_for_selector("#token-prompt input[name=token]")
        page.fill("#token-prompt input[name=token]", "s3cret")
        page.click("#token-prompt button")
        page.wait_for_selector("html[data-ready=true]")
        assert page.query_selector("#token-prompt") is None
        # #token=... in the address is taken, stored and removed from the address.
        page.evaluate("localStorage.clear()")
        page.goto(base_url + "/health#token=s3cret")
        page.wait_for_selector("html[data-ready=true]")
        assert "#token" not in page.url
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "test_401_asks_for_a_token.png"))
        context.close()
    finally:
        stop()


def test_unknown_run_says_not_found(backend, tab):
    page = tab.page
    page.goto(backend.base_url + "/experiments/0123456789abcdef0123456789abcdef")
    page.wait_for_selector("html[data-ready=error]")
    assert page.inner_text("main h1") == "Not found"
    assert page.inner_text("main .error") == "experiment 0123456789abcdef0123456789abcdef not found"
    tab.errors.clear()  # the browser logs the 404 response


def test_page_helpers(backend, tab):
    """The page's pure functions, run in the browser as the page loads them."""
    page = tab.open("/health")
    got = page.evaluate("""async () => {
        const list = await import('/assets/list.js');
        const chart = await import('/assets/chart.js');
        const run = await import('/assets/run.js');
        const board = await import('/assets/board.js');
        return {
            plain: list.buildFilter('resnet', ''),
            quoted: list.buildFilter(' a"b\\\\c ', 'params.lr = 0.1'),
            advanced: list.buildFilter('', 'owner = "x"'),
            ema0: chart.ema([1, 2, 3], 0),
            ema: chart.ema([1, null, 3], 0.5).map(v => v === null ? null : Math.round(v * 1e6) / 1e6),
            flat: run.flatten({a: 1, b: {c: 2, d: {e: 'x'}}, f: [1, 2], g: {}}),
            groups: ['train/loss', 'val/a/b', 'lr', '/x'].map(board.groupOf),
        };
    }""")
    assert got["plain"] == 'name ~ "resnet"'
    assert got["quoted"] == 'name ~ "a\\"b\\\\c" and params.lr = 0.1'
    assert got["advanced"] == 'owner = "x"'
    assert got["ema0"] == [1, 2, 3]
    # Debiased: the first value is kept; 3 after 1 with weight 0.5 -> (0.25 + 1.5) / 0.75.
    assert got["ema"] == [1, None, round(1.75 / 0.75, 6)]
    assert got["flat"] == {"a": 1, "b.c": 2, "b.d.e": "x", "f": [1, 2], "g": {}}
    assert got["groups"] == ["train", "val", "", ""]
