"""Screenshots of a study in the MLflow UI and in optuna-dashboard, checked against the study itself.

Setup, once (Debian's Chromium; optuna-dashboard is in the `review` and `test` extras):

    apt-get install -y chromium && .venvs/main/bin/pip install 'optuna-dashboard==0.21.0'

Usage:

    .venvs/main/bin/python mlflow/screenshots.py bench/results/review-2026-12-06-toy-study mlflow/screenshots

STORE is a folder with `mlflow.db`, `optuna.db` and `mlartifacts/` (a `--home` of `search run`, or a
committed copy of one). It is copied to a temporary folder (the artifact locations MLflow recorded
are pointed at the copy), served by `mlflow ui` and `optuna-dashboard` on 127.0.0.1, and each page is
loaded in headless Chromium twice: once for its PNG and once for its DOM after the page's scripts
ran. What each page must show is read from the stores with MLflow's and Optuna's clients, and looked
for in that DOM text (`checks.json` lists every check and what was found); a page that does not show
it fails the script (exit status 1), so the screenshots cannot silently go stale:

- MLflow, the experiment as it opens: its description names the best feasible trial; that trial's
  row (its run name: verdict, J/request, recovery against the gate) is visible;
- MLflow, the view the description links (a shared view state: sorted by energy per request, the
  answer's columns beside the default ones): the best feasible trial's row comes before every other
  feasible trial's;
- MLflow, the study's run: its name and description give the best trial and the break-even;
- MLflow, the study's Pareto figure;
- optuna-dashboard, the study: the objective named with its unit, and trials that fail the gate or
  cannot run shown as "Infeasible" (from the constraints it reads; with Optuna 5's named keys it
  showed them as "Complete").
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
VENV_BIN = PROJECT / ".venvs" / "main" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1.0)
    raise SystemExit(f"error: {url} did not answer within {seconds:.0f} s")


def copy_store(store: Path, into: Path) -> Path:
    """The store's databases and artifacts in `into`, MLflow's artifact locations pointed there."""
    for name in ("mlflow.db", "optuna.db"):
        if not (store / name).is_file():
            raise SystemExit(f"error: {store} holds no {name}")
        shutil.copy2(store / name, into / name)
    if (store / "mlartifacts").is_dir():
        shutil.copytree(store / "mlartifacts", into / "mlartifacts")
    target = (into / "mlartifacts").resolve().as_uri()
    with sqlite3.connect(into / "mlflow.db") as db:
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
            for key, value in db.execute(f"SELECT rowid, {column} FROM {table}").fetchall():
                if value and "/mlartifacts" in value:
                    db.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?",
                               (target + value.split("/mlartifacts", 1)[1], key))
    return into


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("error: no Chromium (apt-get install -y chromium; see this script's docstring)")


def load(url: str, png: Path | None, width: int, height: int, profile: Path) -> str:
    """The page's PNG (when asked) and its DOM as text, after its scripts ran."""
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", f"--window-size={width},{height}", "--virtual-time-budget=25000"]
    # The DOM first: the second load (the profile's caches warm) shows the page as it settles, shared
    # views applied, in the screenshot.
    dom = subprocess.run([*base, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=180).stdout
    if png is not None:
        subprocess.run([*base, f"--screenshot={png}", url], check=True, capture_output=True, timeout=180)
    if os.environ.get("SCREENSHOT_DOM_DIR") and png is not None:  # to see what a failing check looked in
        Path(os.environ["SCREENSHOT_DOM_DIR"], png.stem + ".txt").write_text(dom_text(dom))
    return dom_text(dom)


def dom_text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def expectations(home: Path, study_name: str) -> dict:
    """What the pages must show, read from the stores with MLflow's and Optuna's own clients."""
    sys.path.insert(0, str(PROJECT))
    import optuna
    from mlflow.tracking import MlflowClient

    from search.summaries import best_feasible, is_infeasible
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{home / 'optuna.db'}")
    best = best_feasible(study)
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(study_name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parent = next(r for r in runs if r.data.tags.get("search.study_parent") == "true")
    trials = {int(r.data.tags["search.trial"]): r for r in runs if "search.trial" in r.data.tags}
    feasible = [r.info.run_name for n, r in trials.items() if r.data.tags.get("verdict") == "PASS"
                and (best is None or n != best.number)]
    return {"experiment_id": experiment.experiment_id, "parent_run_id": parent.info.run_id,
            "parent_name": parent.info.run_name, "study_id": optuna.storages.RDBStorage(f"sqlite:///{home / 'optuna.db'}").get_study_id_from_name(study_name),
            "best_trial": None if best is None else best.number,
            "best_name": None if best is None else trials[best.number].info.run_name,
            "other_feasible_names": feasible, "break_even": parent.data.tags.get("break_even", ""),
            "metric_names": study.metric_names, "n_infeasible": sum(
                1 for t in study.get_trials(deepcopy=False)
                if t.state.is_finished() and (is_infeasible(t) or not t.user_attrs.get("feasible", True)))}


def visible(text: str, words: str) -> bool:
    """Whether `words` shows in the page text (MLflow cuts a long run name in its cell with an ellipsis
    only by CSS: the DOM holds it whole)."""
    return " ".join(words.split()) in text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path, help="folder with mlflow.db, optuna.db and mlartifacts/")
    parser.add_argument("out", type=Path, help="where the PNGs and checks.json go")
    parser.add_argument("--study", default="gemma4-energy")
    parser.add_argument("--width", type=int, default=2200, help="window width in pixels (MLflow's table "
                        "renders only the columns that fit)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    checks: list[dict] = []

    def check(page: str, what: str, ok: bool, found: str = "") -> None:
        checks.append({"page": page, "check": what, "ok": bool(ok), **({"found": found[:300]} if found else {})})
        print(f"{'ok  ' if ok else 'FAIL'} {page}: {what}", flush=True)

    with tempfile.TemporaryDirectory(prefix="screenshots-") as folder:
        home = copy_store(args.store.resolve(), Path(folder))
        expect = expectations(home, args.study)
        mlflow_port, dashboard_port = free_port(), free_port()
        logs = Path(folder) / "logs"
        logs.mkdir()
        servers = [
            subprocess.Popen([str(VENV_BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
                              "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"],
                             stdout=open(logs / "mlflow.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
                             # Reading needs no job runner (MLflow 3 starts a dozen consumers for it).
                             env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
            subprocess.Popen([str(VENV_BIN / "optuna-dashboard"), f"sqlite:///{home / 'optuna.db'}",
                              "--host", "127.0.0.1", "--port", str(dashboard_port)],
                             stdout=open(logs / "dashboard.log", "w"), stderr=subprocess.STDOUT,
                             start_new_session=True)]
        try:
            mlflow_url, dashboard_url = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{dashboard_port}"
            wait_for(f"{mlflow_url}/health", 180)
            wait_for(f"{dashboard_url}/api/studies", 60)
            profile = Path(folder) / "chromium"
            experiment = f"{mlflow_url}/#/experiments/{expect['experiment_id']}"
            best = f"Best feasible: trial {expect['best_trial']}"

            text = load(f"{experiment}/runs", args.out / "mlflow-runs.png", args.width, 1000, profile)
            page = "mlflow-runs.png (the experiment as it opens)"
            check(page, f"the description names the best feasible trial ({best!r})", visible(text, best))
            check(page, f"the best trial's row shows {expect['best_name']!r}", visible(text, expect["best_name"]))
            check(page, "the folded description links the sorted view", visible(text, "every trial by energy"))

            # The view the experiment's description links: MLflow's shared view state (search/review.py).
            text = load(f"{experiment}/runs?viewStateShareKey=answer", args.out / "mlflow-runs-by-energy.png",
                        args.width, 1000, profile)
            page = "mlflow-runs-by-energy.png (the description's link: sorted by energy, the answer's columns)"
            at = text.find(" ".join(expect["best_name"].split()))
            others = [text.find(" ".join(n.split())) for n in expect["other_feasible_names"]]
            check(page, "the best feasible trial's row comes before every other feasible trial's",
                  at >= 0 and all(o < 0 or o > at for o in others), text[at:at + 200] if at >= 0 else "")
            check(page, "the answer's columns are shown (verdict, energy, recovery)",
                  all(visible(text, c) for c in ("verdict", "energy_j_per_request", "recovery_mean")),
                  text[text.find("Run Name"):text.find("Run Name") + 300])

            text = load(f"{experiment}/runs/{expect['parent_run_id']}", args.out / "mlflow-study-run.png",
                        args.width, 1100, profile)
            page = "mlflow-study-run.png (the study's run)"
            check(page, f"its name {expect['parent_name']!r}", visible(text, expect["parent_name"]))
            check(page, "its description names the best trial and the break-even",
                  visible(text, best) and visible(text, expect["break_even"]))

            text = load(f"{experiment}/runs/{expect['parent_run_id']}/artifacts/pareto.png",
                        args.out / "mlflow-pareto.png", args.width, 1000, profile)
            check("mlflow-pareto.png (the study's Pareto figure)", "pareto.png is the artifact shown",
                  visible(text, "pareto.png"))

            text = load(f"{dashboard_url}/dashboard/studies/{expect['study_id']}", args.out / "optuna-dashboard.png",
                        args.width, 1100, profile)
            page = "optuna-dashboard.png (the study)"
            unit = expect["metric_names"][0] if expect["metric_names"] else "energy per request [J]"
            check(page, f"the objective is named with its unit ({unit!r})", visible(text, unit))
            if expect["n_infeasible"]:  # its timeline's legend, from the constraints it reads
                check(page, "trials that fail the gate or cannot run show as Infeasible",
                      visible(text, "Infeasible"))
        finally:
            for server in servers:  # each leads its own session: its workers go with it
                for sig, wait_s in ((15, 30), (9, 10)):
                    try:
                        os.killpg(server.pid, sig)
                        server.wait(timeout=wait_s)
                        break
                    except ProcessLookupError:
                        break
                    except subprocess.TimeoutExpired:
                        continue
    (args.out / "checks.json").write_text(json.dumps({"store": str(args.store), "study": args.study,
                                                      "expected": expect, "checks": checks}, indent=2) + "\n")
    failed = [c for c in checks if not c["ok"]]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed; {args.out / 'checks.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
