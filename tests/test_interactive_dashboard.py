"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): change the LR from the page,
save and load a checkpoint from the page (naming the new branch), see the run follow, and see the uPlot
charts (loss, LR, gradient norm, validation accuracy) draw, zoom and switch the loss axis to linear."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest
from PIL import Image

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from metagrad.interactive import Trainer, build_problem  # noqa: E402
from metagrad.interactive.agents import wait_until  # noqa: E402
from metagrad.interactive.screenshot import ARGS  # noqa: E402
from metagrad.interactive.server import ControlServer  # noqa: E402

CHROMIUM = os.environ.get("METAGRAD_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")

SPEC = {"dataset": {"name": "blobs", "num_examples": 300}, "model": {"name": "mlp", "hidden": [12]},
        "optimizer": {"name": "sgd", "hyperparams": {"learning_rate": 0.05, "momentum": 0.9}},
        "num_steps": 60, "batch_size": 16, "seed": 0}

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"no Chromium at {CHROMIUM}: apt-get install -y chromium")


def wait_for(predicate, timeout=30.0):
    return wait_until(predicate, timeout)


@pytest.fixture
def page_and_run(tmp_path):
    # 60 steps at 0.25 s each keep the run going for the whole test; it is stopped at the end
    trainer = Trainer(build_problem(SPEC), spec=SPEC, log_path=str(tmp_path / "log.jsonl"),
                      checkpoint_dir=str(tmp_path / "ckpt"), eval_every=5, min_step_seconds=0.25).start()
    server = ControlServer(trainer).start()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(server.dashboard_url, timeout=30000)
        yield page, trainer, server, errors
        browser.close()
    trainer.request_stop()
    trainer.join(10)
    server.stop()


def test_dashboard_changes_lr_and_forks_a_branch(page_and_run, tmp_path):
    page, trainer, server, errors = page_and_run
    expect = sync_api.expect
    expect(page.locator("#ws-state")).to_have_text("ws: live", timeout=30000)
    expect(page.locator("#hp-learning_rate")).to_be_visible(timeout=30000)

    # change the LR from the page: the run's LR changes, and the page shows it
    page.fill("#hp-learning_rate", "0.0123")
    page.click("#set-learning_rate")
    assert wait_for(lambda: abs(trainer.hyperparams()["learning_rate"] - 0.0123) < 1e-7)
    expect(page.locator("#hp-current-learning_rate")).to_have_text("0.01230", timeout=30000)
    expect(page.locator("#log-table tbody")).to_contain_text("set_hyperparams", timeout=30000)

    # a bad value is refused by the page, and the run is untouched
    page.fill("#hp-learning_rate", "fast")
    page.click("#set-learning_rate")
    expect(page.locator("#command-list li.failed").first).to_contain_text("must be a number")
    assert abs(trainer.hyperparams()["learning_rate"] - 0.0123) < 1e-7

    # save a checkpoint from the page, then load it under a branch name: the named branch appears in the tree
    page.fill("#ckpt-name", "page-ckpt")
    page.click("#btn-save")
    expect(page.locator("#load-page-ckpt")).to_be_visible(timeout=30000)
    saved_step = trainer.checkpoints["page-ckpt"]["step"]
    assert wait_for(lambda: trainer.t > saved_step)
    page.fill("#branch-name-page-ckpt", "bad/name")  # refused by the page: nothing is sent
    page.click("#load-page-ckpt")
    expect(page.locator("#command-list li.failed").first).to_contain_text("branch name")
    assert trainer.branch == 0
    page.fill("#branch-name-page-ckpt", "low lr")
    page.click("#load-page-ckpt")
    expect(page.locator("#branch-1")).to_contain_text("page-ckpt", timeout=30000)
    expect(page.locator("#branch-1")).to_contain_text("low lr")
    expect(page.locator("#run-branch")).to_have_text("1", timeout=30000)
    assert trainer.branch == 1 and trainer.branches[1]["fork_step"] == saved_step
    assert trainer.branches[1]["name"] == "low lr"
    expect(page.locator("#loss-chart .u-legend")).to_contain_text("low lr train", timeout=30000)
    assert os.path.isdir(tmp_path / "ckpt" / "trees" / "page-ckpt")  # saved in the run's store

    # every command's final status is shown (a late 202 "requested" never overwrites a "succeeded")
    assert wait_for(lambda: page.evaluate(
        "() => [...document.querySelectorAll('#command-list li')].every(li => li.className !== 'pending')"))

    check_charts(page, tmp_path)

    # the charts received metrics and the page raised no script error
    assert page.evaluate("() => state.metrics.length") > 0
    # uPlot is served by the dashboard's own server: the page loads nothing from anywhere else
    loaded = page.evaluate("() => performance.getEntriesByType('resource').map(e => e.name)")
    assert any(u.endswith("/static/uPlot.iife.min.js") for u in loaded)
    assert all(u.startswith(server.base_url) for u in loaded), loaded
    assert errors == []
    r = httpx.get(server.base_url + "/api/log", headers={"X-Token": server.token}).json()
    assert [e["command"] for e in r] == ["set_hyperparams", "save_checkpoint", "load_checkpoint"]


def test_dashboard_without_token_shows_how_to_get_in(page_and_run):
    page, trainer, server, errors = page_and_run
    # this page got in through the printed link: its token now rides in a session cookie, not in the URL
    sync_api.expect(page.locator("#ws-state")).to_have_text("ws: live", timeout=30000)
    assert "token" not in page.url
    assert page.evaluate("() => document.cookie") == ""  # HttpOnly: the page's scripts cannot read it
    page.reload()
    sync_api.expect(page.locator("#ws-state")).to_have_text("ws: live", timeout=30000)
    # a browser that never had the link is refused, and told how to get in
    other = page.context.browser.new_context().new_page()
    other.goto(server.base_url + "/", timeout=30000)
    assert "valid token is required" in other.content()
    other.context.close()


CHARTS = ("loss", "lr", "grad", "acc")


def check_charts(page, tmp_path):
    # each chart is a uPlot instance with a step axis and at least one branch's series holding data
    assert wait_for(lambda: page.evaluate("""names => names.every(k => {
        const u = window.charts[k];
        return u && u.data[0].length > 0 && u.data.slice(1).some(ys => ys.some(v => v != null)); })""", CHARTS))
    # one series per branch, labelled by the branch's name (the new branch's first evaluation may still be due)
    assert wait_for(lambda: page.evaluate("() => charts.loss.series.map(s => s.label)")[1:] == [
        "main train", "low lr train", "main val", "low lr val"])
    distr = "() => [charts.loss.scales.y.distr, charts.lr.scales.y.distr, charts.grad.scales.y.distr]"
    assert page.evaluate(distr) == [3, 3, 3]  # log by default
    assert page.evaluate("() => charts.acc.scales.y.distr") == 1

    # the log-scale box switches the loss axis to linear and back
    page.uncheck("#loss-log")
    assert wait_for(lambda: page.evaluate("() => charts.loss.scales.y.distr") == 1)
    page.check("#loss-log")
    assert wait_for(lambda: page.evaluate("() => charts.loss.scales.y.distr") == 3)

    # drag to zoom on x: the zoom survives the data that keeps arriving; a double-click zooms out again
    box = page.locator("#loss-chart .u-over").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + 20)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + 30, steps=4)
    page.mouse.up()
    zoomed = page.evaluate("() => [charts.loss.scales.x.max, charts.loss.data[0].length]")
    assert zoomed[0] < page.evaluate("() => charts.loss.data[0].at(-1)")
    assert wait_for(lambda: page.evaluate("() => charts.loss.data[0].length") > zoomed[1])
    assert page.evaluate("() => charts.loss.scales.x.max") == pytest.approx(zoomed[0])
    page.dblclick("#loss-chart .u-over")
    assert wait_for(lambda: page.evaluate("() => charts.loss.scales.x.max === charts.loss.data[0].at(-1)"))

    # a non-finite number arrives as null: the charts leave a gap and carry on
    step = page.evaluate("""() => {
        const step = state.metrics.at(-1).step + 1000, branch = 0;
        handle({ type: "metrics", step, branch, train_loss: null, grad_norm: null, lr: null, step_time: null });
        handle({ type: "eval", step, branch, val_loss: null, val_accuracy: null });
        return step; }""")
    assert wait_for(lambda: page.evaluate("() => charts.loss.data[0].at(-1)") == step)
    assert page.evaluate("() => [charts.loss.data[1].at(-1), charts.acc.data[1].at(-1)]") == [None, None]

    # what the charts drew is a picture, not a blank box
    for name in CHARTS:
        path = tmp_path / f"{name}.png"
        page.locator(f"#{name}-chart").screenshot(path=str(path))
        with Image.open(path) as img:
            assert img.width > 300 and img.height > 100
            assert len(img.convert("RGB").getcolors(1 << 20)) > 20, f"{name} chart looks blank"
