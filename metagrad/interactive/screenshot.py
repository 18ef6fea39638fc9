"""Take a screenshot of the dashboard during a short steered run on the built-in problem.

    python -m metagrad.interactive.screenshot docs/dashboard.png [--chromium /usr/bin/chromium]

It starts the trainer and the server on 127.0.0.1, steers the run through the API
(an LR change, a checkpoint and a fork), asks the page for an LR suggestion, and
saves a full-page screenshot taken by headless Chromium (Playwright).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import httpx

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def main(argv=None) -> int:
    from playwright.sync_api import sync_playwright

    from .problems import BUILTIN_SPEC, build_problem
    from .server import ControlServer
    from .trainer import Trainer

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--num-steps", type=int, default=900)
    args = parser.parse_args(argv)

    spec = copy.deepcopy(BUILTIN_SPEC)
    spec["num_steps"] = args.num_steps
    spec["optimizer"]["hyperparams"]["learning_rate"] = 0.2
    tmp = tempfile.mkdtemp()
    trainer = Trainer(build_problem(spec), spec=spec, log_path=f"{tmp}/log.jsonl", checkpoint_dir=f"{tmp}/ckpt",
                      eval_every=25, min_step_seconds=0.01).start()
    server = ControlServer(trainer).start()
    api = httpx.Client(base_url=server.base_url, headers={"X-Token": server.token}, timeout=60)

    def at(step):
        while trainer.t < step and trainer.alive:
            time.sleep(0.01)

    def send(cmd):
        rec = api.post("/api/commands", json=cmd).json()
        while api.get(f"/api/commands/{rec['id']}").json()["status"] in ("requested", "running"):
            time.sleep(0.02)

    try:
        at(150)
        send({"command": "save_checkpoint", "name": "warm"})
        at(300)
        send({"command": "set_hyperparams", "values": {"learning_rate": 0.6}})
        at(420)
        send({"command": "load_checkpoint", "checkpoint": "warm"})
        send({"command": "set_hyperparams", "values": {"learning_rate": 0.05}})
        at(450)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server.dashboard_url)
            page.wait_for_selector("#hp-learning_rate")
            page.fill("#suggest-window", "100")
            page.click("#btn-suggest")
            page.wait_for_selector("#suggest-text", timeout=120000)
            at(700)
            page.wait_for_timeout(1500)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        trainer.request_stop()
        trainer.join(30)
        server.stop()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
