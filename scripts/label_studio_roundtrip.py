"""The human loop against a real Label Studio, end to end (run by hand, outside CI).

Usage:
    python3.11 -m venv ../ls-venv && ../ls-venv/bin/pip install label-studio==1.23.2
    .venv/bin/python scripts/label_studio_roundtrip.py --label-studio ../ls-venv/bin/label-studio
        [--work DIR] [--port 8089]

What it does, on digits-det tiny with the tiny model, ``al.oracle: human`` and
``labeling.document_root`` set to the data folder:

1. starts Label Studio on 127.0.0.1 (local-files serving under that root, a fresh data dir);
2. ``detloop run``: the loop exports its first query (COCO + Label Studio tasks and labeling
   config) and waits for labels;
3. for each query: creates a project from the exported labeling config, connects the local
   files, imports the tasks (checks every task arrived, with its pre-annotations when the loop
   had a model, and that Label Studio serves each task's image), annotates every task through
   the API (with the hidden ground truth, as a careful person would), exports the project as
   COCO, runs ``detloop import-labels`` on that export and ``detloop resume``;
4. prints what happened at each step and writes it to ``WORK/roundtrip.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
DETLOOP = [sys.executable, "-m", "detloop.cli"]


def start_label_studio(exe: str, work: Path, port: int, root: Path, token: str) -> Any:
    env = {
        **os.environ,
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(root),
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
    }
    log = open(work / "label_studio.log", "w")  # kept open for the server's lifetime
    cmd = [exe, "start", "--no-browser", "--host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(work / "ls-data"), "--username", "detloop@example.com",
           "--password", secrets.token_hex(8), "--user-token", token]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"Label Studio exited; see {work / 'label_studio.log'}")
        time.sleep(1)
    proc.terminate()
    raise SystemExit("Label Studio did not answer within 4 minutes")


def allow_token_auth(work: Path, api: Any) -> None:
    """Label Studio ≥ 1.18 disables the legacy ``Token`` API auth of new organizations (JWT
    personal tokens replace it); this local, throw-away instance turns it back on in its own
    database so the script can use the token it started the server with."""
    import sqlite3
    from datetime import UTC, datetime

    if api.s.get(f"{api.url}/api/projects", timeout=30).status_code != 401:
        return
    db = sqlite3.connect(work / "ls-data" / "label_studio.sqlite3")
    with db:
        if (
            db.execute("UPDATE jwt_auth_jwtsettings SET legacy_api_tokens_enabled = 1").rowcount
            == 0
        ):
            now = datetime.now(UTC).isoformat()
            for (org,) in db.execute("SELECT id FROM organization").fetchall():
                db.execute(
                    "INSERT INTO jwt_auth_jwtsettings (organization_id, api_tokens_enabled, "
                    "api_token_ttl_days, legacy_api_tokens_enabled, created_at, updated_at) "
                    "VALUES (?, 1, 73000, 1, ?, ?)",
                    (org, now, now),
                )
    db.close()
    if api.s.get(f"{api.url}/api/projects", timeout=30).status_code == 401:
        raise SystemExit("Label Studio refuses the API token")


class Api:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.s = requests.Session()
        self.s.headers["Authorization"] = f"Token {token}"

    def call(self, method: str, path: str, **kw: Any) -> Any:
        r = self.s.request(method, f"{self.url}{path}", timeout=120, **kw)
        if r.status_code >= 400:
            raise SystemExit(f"{method} {path}: {r.status_code} {r.text[:500]}")
        return r


def detloop(*args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*DETLOOP, *args], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"detloop {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out


def gt_results(task: dict[str, Any], gt: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The hidden ground truth of a task's image as Label Studio regions (percent units)."""
    image = task["data"]["image"]
    name = Path(image.split("?d=")[-1]).name
    w, h = task["data"].get("width"), task["data"].get("height")
    out = []
    for box in gt.get(name, []):
        x, y, bw, bh = box["bbox"]
        width, height = box["width"], box["height"]
        out.append({
            "from_name": "label", "to_name": "image", "type": "rectanglelabels",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"x": 100 * x / width, "y": 100 * y / height, "width": 100 * bw / width,
                      "height": 100 * bh / height, "rotation": 0,
                      "rectanglelabels": [box["name"]]},
        })  # fmt: skip
    del w, h
    return out


def hidden_gt(pool_json: Path) -> dict[str, list[dict[str, Any]]]:
    doc = json.loads(pool_json.read_text())
    names = {c["id"]: c["name"] for c in doc["categories"]}
    images = {i["id"]: i for i in doc["images"]}
    out: dict[str, list[dict[str, Any]]] = {}
    for a in doc["annotations"]:
        im = images[a["image_id"]]
        box = {"bbox": a["bbox"], "name": names[a["category_id"]], "width": im["width"],
               "height": im["height"]}  # fmt: skip
        out.setdefault(Path(im["file_name"]).name, []).append(box)
    return out


def one_query(api: Api, run: Path, it: int, root: Path, gt: dict[str, Any]) -> dict[str, Any]:
    """One query through Label Studio: project, storage, import, annotate, export, import-labels."""
    stem = run / "exports" / f"query_iter_{it:04d}"
    tasks = json.loads(Path(f"{stem}.label_studio.json").read_text())
    config = Path(f"{stem}.label_studio.xml").read_text()
    project = api.call("POST", "/api/projects", json={"title": f"detloop query {it}",
                                                        "label_config": config}).json()  # fmt: skip
    pid = project["id"]
    # a folder under the document root (Label Studio refuses the root itself)
    storage = {"project": pid, "path": str(root / "images"), "use_blob_urls": False,
               "title": "digits-det"}  # fmt: skip
    api.call("POST", "/api/storages/localfiles", json=storage)
    imported = api.call("POST", f"/api/projects/{pid}/import", json=tasks).json()
    listed = api.call("GET", f"/api/projects/{pid}/tasks", params={"page_size": 1000}).json()
    listed = listed["tasks"] if isinstance(listed, dict) else listed
    with_regions = 0
    served = 0
    for task in listed:
        full = api.call("GET", f"/api/tasks/{task['id']}").json()
        preds = full.get("predictions") or []
        with_regions += any(p.get("result") for p in preds)
        img = api.s.get(f"{api.url}{task['data']['image']}", timeout=30)
        served += img.status_code == 200 and img.headers.get("content-type", "").startswith("image")
        api.call("POST", f"/api/tasks/{task['id']}/annotations",
                 json={"result": gt_results(full, gt), "was_cancelled": False})  # fmt: skip
    export = api.call("GET", f"/api/projects/{pid}/export", params={"exportType": "COCO"})
    with zipfile.ZipFile(io.BytesIO(export.content)) as z:
        name = next(n for n in z.namelist() if n.endswith(".json"))
        coco = json.loads(z.read(name))
    coco_file = run.parent / f"label_studio_export_{it}.json"
    coco_file.write_text(json.dumps(coco))
    imported_labels = detloop("import-labels", str(run), str(coco_file)).stdout.strip()
    return {
        "iteration": it, "tasks_exported": len(tasks), "tasks_imported": imported["task_count"],
        "predictions_imported": imported.get("prediction_count"), "tasks_listed": len(listed),
        "tasks_with_regions": with_regions, "images_served": served,
        "coco_images": len(coco["images"]), "coco_boxes": len(coco["annotations"]),
        "coco_categories": sorted(c["name"] for c in coco["categories"]),
        "import_labels": imported_labels.splitlines()[0],
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label-studio", required=True, help="the label-studio executable")
    ap.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "detloop-label-studio"
    )
    ap.add_argument("--port", type=int, default=8089)
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "digits-tiny"
    if not (data / "pool.json").exists():
        detloop("make-dataset", "digits", "--size", "tiny", "--out", str(data))
    token = secrets.token_hex(20)
    proc, url = start_label_studio(args.label_studio, work, args.port, data, token)
    report: dict[str, Any] = {"label_studio": url, "queries": []}
    try:
        api = Api(url, token)
        allow_token_auth(work, api)
        report["version"] = api.call("GET", "/api/version").json().get("release")
        sets = [f"runs_root={work / 'runs'}", "al.oracle=human", "al.iterations=2",
                f"labeling.document_root={data}", "ray.in_process=true", "tracking.enabled=false",
                "train.epochs=300", "train.max_steps=300", "predict.min_score=0.1"]  # fmt: skip
        # (a few steps on 6 images: the floor lets its weak boxes show as pre-annotations)
        for split in ("pool", "val"):
            sets += [f"data.{split}.source={data / f'{split}.json'}",
                     f"data.{split}.images={data / 'images' / split}"]  # fmt: skip
        argv = ["run", str(REPO / "configs" / "ci.yaml"), *[a for s in sets for a in ("--set", s)]]
        first = detloop(*argv)
        run = work / "runs" / "ci" / "entropy-s0"
        report["waiting_message"] = [ln for ln in first.stderr.splitlines() if "label" in ln][:3]
        gt = hidden_gt(data / "pool.json")
        for it in range(2):
            report["queries"].append(one_query(api, run, it, data, gt))
            resumed = detloop("resume", str(run))
            report["queries"][-1]["resume"] = resumed.stdout.strip().splitlines()[-1:]
        status = detloop("status", str(run)).stdout
        report["final_status"] = status.strip().splitlines()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    (work / "roundtrip.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))  # noqa: T201 - the script's output
    return 0


if __name__ == "__main__":
    sys.exit(main())
