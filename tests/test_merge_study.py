"""bench/gpu/merge_study.sh: what GPU machines bring back folded into a study's committed results
folder, every record kept, the answers split from what travels back to the next machine."""

import subprocess
import tarfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
SCRIPT = PROJECT / "bench" / "gpu" / "merge_study.sh"


def pack(path: Path, files: dict[str, str]) -> Path:
    """A tar.gz of `files` ({member name: text}), as the machine packs /tmp/product."""
    source = path.with_suffix(".src")
    for name, text in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text)
    with tarfile.open(path, "w:gz") as tar:
        for name in files:
            tar.add(source / name, arcname=name)
    return path


def members(path: Path) -> dict[str, str]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile() or m.islnk()}


def test_the_packs_are_folded_in_nothing_lost_and_the_answers_kept_apart(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    trial = "product/studies/s/trial-0000"
    pack(folder / "product-study.tgz", {  # as committed before the split: answers inside
        "product/optuna.db": "one trial", f"{trial}/answers.jsonl": "a0", f"{trial}/server.log": "log0",
        "product/mlartifacts/r0/artifacts/answers.jsonl": "a0", "product-export/trial-0000/README.md": "front 0"})
    first = pack(tmp_path / "first.tgz", {"product/optuna.db": "two trials", "product/studies/s/trial-0001/answers.jsonl": "a1",
                                          "product-export/trial-0001/README.md": "front 1"})
    # A pack over 15 MB comes back in pieces: .00 stands for them all.
    whole = pack(tmp_path / "whole.tgz", {"product/optuna.db": "three trials",
                                          "product/studies/s/trial-0002/server.log": "log2"}).read_bytes()
    half = len(whole) // 2
    (tmp_path / "second.tgz.00").write_bytes(whole[:half])
    (tmp_path / "second.tgz.01").write_bytes(whole[half:])

    done = subprocess.run(["bash", str(SCRIPT), str(folder), str(first), str(tmp_path / "second.tgz.00")],
                          capture_output=True, text=True, check=True)
    assert "4 files in trial folders, 3 answers files" in done.stdout

    study, answers = members(folder / "product-study.tgz"), members(folder / "product-answers.tgz")
    assert study == {"product/optuna.db": "three trials", f"{trial}/server.log": "log0",
                     "product/studies/s/trial-0002/server.log": "log2",
                     "product-export/trial-0001/README.md": "front 1"}  # the newest export, whole
    with tarfile.open(folder / "product-answers.tgz") as tar:
        names = sorted(m.name for m in tar.getmembers())
    assert names == ["product/mlartifacts/r0/artifacts/answers.jsonl", f"{trial}/answers.jsonl",
                     "product/studies/s/trial-0001/answers.jsonl"]
    assert answers[f"{trial}/answers.jsonl"] == "a0" and answers["product/studies/s/trial-0001/answers.jsonl"] == "a1"

    # Folded again with the same packs: the same records (the answers come from their own file now).
    subprocess.run(["bash", str(SCRIPT), str(folder), str(first)], capture_output=True, check=True)
    assert members(folder / "product-study.tgz")["product/optuna.db"] == "two trials"  # the pack given last wins
    assert set(members(folder / "product-study.tgz")) == set(study)
    assert sorted(m for m in members(folder / "product-answers.tgz")) == names
