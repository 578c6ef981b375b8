"""Check a trained version's MLflow UI pages in a real browser (Debian's chromium, headless).

    .venv/bin/python hack/check_mlflow_ui.py [--workdir DIR]

Trains a tiny model with the real trainer (one process, CPU, a few seconds; the spec asks for a
`line-em` evaluation so the card has an eval row), starts a real `mlflow server` on that registry,
and opens the version page, the training run and the eval run with Playwright. Passes when the
version page shows the model card and a non-empty Schema, the runs show their source, user and link,
and no request failed (status >= 400) and no console error was logged on any page.

The MLflow UI always asks `/ajax-api/2.0/mlflow/users/current`; only MLflow's basic-auth app
answers it (a plain `mlflow server` answers 404). So the server runs with `--app-name basic-auth`
(what `mlflow[auth]` adds: Flask-WTF) and the browser logs in as the admin it creates on first start;
`--no-auth` runs a plain server instead and then accepts exactly that one 404, nothing else.

Playwright and Flask-WTF are not dependencies of midfill: they are installed on first use into a
cache folder (MIDFILL_UI_CHECK_DIR, default ~/.cache/midfill-ui-check) with pip, and only this
script and its server see them; no browser is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
PLAYWRIGHT = ["playwright==1.65.3"]
AUTH_APP = ["flask-wtf==1.3.0", "wtforms==3.3.2"]  # mlflow[auth]; no deps: Flask comes from the venv
MODEL = "ui-check"
# The auth app creates this admin on its first start (its user store is a fresh file in the work folder).
ADMIN = {"username": "admin", "password": secrets.token_urlsafe(16)}
USERS_CURRENT = "/ajax-api/2.0/mlflow/users/current"


def tiny_run() -> dict:
    return {
        "apiVersion": "midfill.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": MODEL},
        "spec": {
            "model": {
                "recipe": "debug",
                "architecture": {
                    "hiddenSize": 64,
                    "numLayers": 2,
                    "numHeads": 4,
                    "numKvHeads": 4,
                    "intermediateSize": 128,
                    "maxPositionEmbeddings": 128,
                },
            },
            "tokenizer": {"vocabSize": 512, "trainBytes": 1_000_000},
            "data": {"sources": [{"uri": "stdlib://json", "include": ["*.py"]}], "validationFraction": 0.3},
            "training": {
                "seqLength": 64,
                "globalBatchTokens": 512,
                "microBatchSize": 4,
                "steps": 10,
                "learningRate": 0.003,
                "warmupSteps": 2,
                "logIntervalSteps": 5,
                "evalIntervalSteps": 10,
                "evalBatches": 1,
            },
            "evaluation": {"suites": ["line-em"], "limit": 3},
            "registry": {"tags": {"team": "ui-check"}},
        },
    }


def extra_packages(auth: bool) -> Path:
    """The cache folder holding Playwright (and the auth app's packages), installed with pip if missing."""
    target = Path(os.environ.get("MIDFILL_UI_CHECK_DIR", Path.home() / ".cache" / "midfill-ui-check"))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--target", str(target)]
    if not (target / "playwright").is_dir():
        subprocess.run([*pip, *PLAYWRIGHT], check=True)
    if auth and not (target / "flask_wtf").is_dir():
        subprocess.run([*pip, "--no-deps", *AUTH_APP], check=True)
    sys.path.insert(0, str(target))
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(work: Path, db: str) -> None:
    run_file = work / "run.yaml"
    run_file.write_text(yaml.safe_dump(tiny_run()))
    env = {**os.environ, "MIDFILL_STATE_DIR": str(work / "state"), "MIDFILL_TRACKING_URI": db, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--run", str(run_file), "--uid", "uid-ui-check", "--attempt", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        sys.exit(f"training failed:\n{proc.stderr[-3000:]}")


def start_server(work: Path, db: str, port: int, auth: bool, extra: Path) -> subprocess.Popen:
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    cmd = [
        str(mlflow_bin),
        "server",
        "--backend-store-uri",
        db,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if auth:
        cmd += ["--app-name", "basic-auth"]
        # The auth app keeps its users in basic_auth.db relative to the working folder: the temp folder.
    log = open(work / "mlflow-server.log", "w")  # noqa: SIM115 - closed with the process
    env = {
        **os.environ,
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN["password"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(extra), os.environ.get("PYTHONPATH")])),
    }
    server = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            break
        time.sleep(0.5)
    stop(server)
    sys.exit(f"mlflow server did not start; see {work / 'mlflow-server.log'}")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, 15)  # its own session: the server and its workers, nothing else
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)


def browse(base: str, pages: list[tuple[str, list[str]]], work: Path, auth: bool) -> list[dict]:
    """Open each (route, texts that must appear) page; returns failures and console errors."""
    from playwright.sync_api import sync_playwright

    problems: list[dict] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-background-networking", "--disable-component-update"],
        )
        context = browser.new_context(
            http_credentials=ADMIN if auth else None, viewport={"width": 1400, "height": 2000}
        )
        for i, (route, texts) in enumerate(pages):
            page = context.new_page()
            page.on("console", lambda m, r=route: m.type == "error" and problems.append({"page": r, "console": m.text}))
            page.on(
                "response",
                lambda resp, r=route: (
                    resp.status >= 400 and problems.append({"page": r, "status": resp.status, "url": resp.url})
                ),
            )
            page.goto(f"{base}/#{route}", wait_until="load")
            for text in texts:
                try:
                    if text.startswith("+"):
                        page.get_by_text("Inputs (2)").first.click()
                        text = text[1:]
                    page.get_by_text(text, exact=False).first.wait_for(timeout=30_000)
                except Exception:  # noqa: BLE001 - reported, with a screenshot
                    problems.append({"page": route, "missing_text": text})
            page.wait_for_timeout(
                3000
            )  # the UI keeps polling, so "network idle" may never come: let late requests land
            page.screenshot(path=str(work / f"page{i}.png"), full_page=True)
            page.close()
        browser.close()
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir", type=Path, help="Keep the registry, logs and screenshots here (default: a temp folder, removed)."
    )
    parser.add_argument(
        "--no-auth",
        action="store_true",
        help=f"Run a plain mlflow server and accept its 404 of {USERS_CURRENT} (only that).",
    )
    args = parser.parse_args()
    auth = not args.no_auth
    extra = extra_packages(auth)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mfui"))
    work.mkdir(parents=True, exist_ok=True)
    db = f"sqlite:///{work / 'mlflow.db'}"
    try:
        train(work, db)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=db, registry_uri=db)
        mv = client.get_model_version(MODEL, "1")
        run = client.get_run(mv.run_id)
        eval_run = client.get_run(mv.tags["eval.line-em.run_id"])
        port = free_port()
        server = start_server(work, db, port, auth, extra)
        try:
            pages = [
                # The Schema lists "Inputs (2)" collapsed; "+suffix" clicks it open and looks for the column.
                (
                    f"/models/{MODEL}/versions/1",
                    ["Lineage", "uid-ui-check", "Evaluations", "exact_match", "Inputs (2)", "Outputs (1)", "+suffix"],
                ),
                (
                    f"/experiments/{run.info.experiment_id}/runs/{run.info.run_id}",
                    [f"midfill trainer ({MODEL}-a1)", run.data.tags["mlflow.user"]],
                ),
                (f"/experiments/{eval_run.info.experiment_id}/runs/{eval_run.info.run_id}", [f"{MODEL} version 1"]),
            ]
            problems = browse(f"http://127.0.0.1:{port}", pages, work, auth)
        finally:
            stop(server)
        allowed = [p for p in problems if not auth and p.get("status") == 404 and USERS_CURRENT in p.get("url", "")]
        allowed += [
            p for p in problems if allowed and "console" in p and "404" in p["console"]
        ]  # the same request, as the console logs it
        failed = [p for p in problems if p not in allowed]
        print(
            json.dumps(
                {
                    "auth_app": auth,
                    "pages": [r for r, _ in pages],
                    "problems": failed,
                    "accepted": allowed,
                    "screenshots": str(work),
                },
                indent=1,
            )
        )
        return 1 if failed else 0
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
