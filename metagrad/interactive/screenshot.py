"""Take a screenshot of the dashboard during a short steered run, on the built-in problem or on yours.

    python -m metagrad.interactive.screenshot docs/screenshots/dashboard_mnist1d.png [--chromium /usr/bin/chromium]
    PYTHONPATH=docs/examples python -m metagrad.interactive.screenshot docs/screenshots/dashboard_user_problem.png \\
        --problem my_problem:problem --num-steps 900

It starts the trainer and the server on 127.0.0.1, steers the run through the API
(a checkpoint, the LR times 3, then a fork from the checkpoint, named "lower lr",
at a third of its LR), asks the page for an LR suggestion, and saves a full-page
screenshot taken by headless Chromium (Playwright).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import httpx

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def run_spec(problem: str | None, num_steps: int) -> dict:
    """The spec of the screenshot's run: ``problem`` (``MODULE:FUNCTION``), or the built-in problem at LR 0.2."""
    if problem:
        return {"problem": problem, "num_steps": num_steps}
    from .problems import BUILTIN_SPEC

    spec = copy.deepcopy(BUILTIN_SPEC)
    spec["num_steps"] = num_steps
    spec["optimizer"]["hyperparams"]["learning_rate"] = 0.2
    return spec


def main(argv=None) -> int:
    from playwright.sync_api import sync_playwright

    from .problems import build_problem
    from .server import ControlServer
    from .trainer import Trainer

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--num-steps", type=int, default=900)
    parser.add_argument("--problem", metavar="MODULE:FUNCTION", default=None,
                        help="your own problem (FUNCTION() in MODULE returns a metagrad.TrainingProblem); "
                             "default: the built-in MLP on MNIST-1D")
    args = parser.parse_args(argv)

    spec = run_spec(args.problem, args.num_steps)
    tmp = tempfile.mkdtemp()
    trainer = Trainer(build_problem(spec), spec=spec, log_path=f"{tmp}/log.jsonl", checkpoint_dir=f"{tmp}/ckpt",
                      eval_every=25, min_step_seconds=0.01).start()
    server = ControlServer(trainer).start()
    api = httpx.Client(base_url=server.base_url, headers={"X-Token": server.token}, timeout=60)

    def at(fraction):
        # the steering happens at fixed fractions of the run, as it did at steps 150..700 of 900
        step = int(args.num_steps * fraction)
        while trainer.t < step and trainer.alive:
            time.sleep(0.01)

    def send(cmd):
        rec = api.post("/api/commands", json=cmd).json()
        while api.get(f"/api/commands/{rec['id']}").json()["status"] in ("requested", "running"):
            time.sleep(0.02)

    def scale_lr(factor):
        # relative changes stay valid for any optimizer's LR range (SGD's 0.2 and AdamW's 3e-3 alike)
        lr = trainer.hyperparams()["learning_rate"]
        send({"command": "set_hyperparams", "values": {"learning_rate": lr * factor}})

    try:
        at(150 / 900)
        send({"command": "save_checkpoint", "name": "warm"})
        at(300 / 900)
        scale_lr(3)
        at(420 / 900)
        send({"command": "load_checkpoint", "checkpoint": "warm", "branch_name": "lower lr"})
        scale_lr(1 / 3)
        at(450 / 900)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server.dashboard_url)
            page.wait_for_selector("#hp-learning_rate")
            page.fill("#suggest-window", "100")
            page.click("#btn-suggest")
            # a refused suggestion shows in the command list; the screenshot is taken either way
            page.wait_for_selector("#suggest-text, #command-list li.failed", timeout=120000)
            at(700 / 900)
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
