import json
from pathlib import Path

import pytest
from PIL import Image

from objectives import builtin_suite
from objectives.tasks import Task, get_task, load_examples, load_registry, load_task_file, subsample_indices

COLOURS = [(i * 20, 255 - i * 20, 7) for i in range(10)]


def test_registry_has_the_shipped_tasks():
    registry = load_registry()
    assert set(registry) == {"builtin_documents", "builtin_scenes", "mmmu_pro", "docvqa"}
    mmmu = registry["mmmu_pro"]
    assert (mmmu.source, mmmu.config, mmmu.split, mmmu.scorer) == (
        "hub:MMMU/MMMU_Pro",
        "standard (10 options)",
        "test",
        "multiple_choice",
    )
    assert mmmu.columns["choices"] == "options" and mmmu.columns["answers"] == "answer"
    docvqa = registry["docvqa"]
    assert (docvqa.source, docvqa.split, docvqa.scorer) == ("hub:lmms-lab/DocVQA", "validation", "anls")
    with pytest.raises(ValueError, match="builtin_scenes"):
        get_task("nope")


def test_builtin_tasks_load_and_reuse_the_cache(tmp_path, monkeypatch):
    registry = load_registry()
    docs = load_examples(registry["builtin_documents"], tmp_path)
    assert len(docs) == 32 and len({e.id for e in docs}) == 32
    assert all(e.image.size == (448, 448) and e.image.mode == "RGB" for e in docs)
    assert docs[0].prompt.startswith("What is the total amount?\n")
    assert docs[0].answers[0].startswith("$")
    # The second task finds the suite the first one generated.
    monkeypatch.setattr(builtin_suite, "generate", lambda *a, **k: pytest.fail("regenerated"))
    scenes = load_examples(registry["builtin_scenes"], tmp_path)
    assert len(scenes) == 32 and scenes[0].id == "scenes-0000"


def _write_jsonl(root: Path, n: int = 10) -> Path:
    (root / "imgs").mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.new("RGB", (8, 8), COLOURS[i]).save(root / "imgs" / f"{i}.png")
        lines.append(
            {
                "image": f"imgs/{i}.png",
                "question": f"Q{i}?",
                "answers": [f"a{i}"],
                "choices": ["x", "y"] if i % 2 else "['x', 'y', 'z']",
            }
        )
    path = root / "items.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_jsonl_source_with_choices_and_subsampling(tmp_path):
    path = _write_jsonl(tmp_path / "data")
    task = Task(
        name="local",
        source=f"jsonl:{path}",
        scorer="multiple_choice",
        prompt_template="{question}\n{choices}\nLetter:",
        columns={"choices": "choices"},
        n_samples=4,
        seed=1,
    )
    examples = load_examples(task, tmp_path / "cache")
    assert len(examples) == 4
    assert examples == load_examples(task, tmp_path / "cache")  # deterministic
    indices = [int(e.id.rsplit("-", 1)[1]) for e in examples]
    assert indices == sorted(indices) == subsample_indices(10, 4, 1)
    for example, i in zip(examples, indices, strict=True):
        assert example.image.getpixel((0, 0)) == COLOURS[i]  # the image the row points at
        assert example.answers == [f"a{i}"]
        choices = "A. x\nB. y" if i % 2 else "A. x\nB. y\nC. z"
        assert example.prompt == f"Q{i}?\n{choices}\nLetter:"
    # A smaller sample with the same seed is a subset of a larger one.
    assert set(subsample_indices(100, 5, 3)) < set(subsample_indices(100, 20, 3))
    assert subsample_indices(10, None, 0) == list(range(10))


def test_yaml_relative_source_and_name_default(tmp_path):
    _write_jsonl(tmp_path / "data")
    yaml_path = tmp_path / "my_task.yaml"
    yaml_path.write_text(
        'source: "jsonl:data/items.jsonl"\nscorer: exact_match\nprompt_template: "{question}"\n'
    )
    task = load_task_file(yaml_path)
    assert task.name == "my_task"
    examples = load_examples(task, tmp_path / "cache")
    assert [e.prompt for e in examples] == [f"Q{i}?" for i in range(10)]


def test_disk_source(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {
            "qid": ["q0", "q1", "q2"],
            "img": [Image.new("RGB", (4, 4), c) for c in COLOURS[:3]],
            "q": ["one?", "two?", "three?"],
            "ans": ["1", "2", "3"],
        }
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    task = Task(
        name="d",
        source=f"disk:{tmp_path / 'ds'}",
        scorer="relaxed_accuracy",
        columns={"id": "qid", "image": "img", "question": "q", "answers": "ans"},
    )
    examples = load_examples(task, tmp_path / "cache")
    assert [(e.id, e.prompt, e.answers) for e in examples] == [
        ("q0", "one?", ["1"]),
        ("q1", "two?", ["2"]),
        ("q2", "three?", ["3"]),
    ]
    assert examples[2].image.getpixel((0, 0)) == COLOURS[2]


def test_imagefolder_source(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (4, 4), COLOURS[i]).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text(
        "".join(
            json.dumps({"file_name": f"{i}.png", "question": f"q{i}?", "answers": [str(i)]}) + "\n"
            for i in range(3)
        )
    )
    task = Task(name="f", source=f"imagefolder:{folder}", scorer="exact_match", n_samples=2, seed=0)
    examples = load_examples(task, tmp_path / "cache")
    assert len(examples) == 2
    for example in examples:
        i = int(example.id.rsplit("-", 1)[1])
        assert example.prompt == f"q{i}?" and example.answers == [str(i)]
        assert example.image.getpixel((0, 0)) == COLOURS[i]
    assert (tmp_path / "cache" / "datasets").is_dir()


@pytest.mark.parametrize(
    "body, match",
    [
        ("source: builtin:scenes\nscorer: exact_match\nn_sample: 5\n", r"bad\.yaml.*'n_sample'"),
        ("source: builtin:scenes\nscorer: exact_match\ncolumns: {img: image}\n", r"bad\.yaml.*'img'"),
        ("source: builtin:scenes\nscorer: bleu\n", r"bad\.yaml.*bleu"),
        ("source: builtin:nope\nscorer: exact_match\n", r"bad\.yaml.*'nope'"),
        ("source: ftp:x\nscorer: exact_match\n", r"bad\.yaml.*ftp:x"),
        ("source: hub:a/b\nscorer: exact_match\n", r"bad\.yaml.*split"),
        (
            "source: builtin:scenes\nscorer: exact_match\nprompt_template: '{question} {answer}'\n",
            r"bad\.yaml.*answer",
        ),
        (
            "source: builtin:scenes\nscorer: exact_match\ncolumns: {choices: options}\n",
            r"bad\.yaml.*\{choices\}",
        ),
        ("- just a list\n", r"bad\.yaml.*mapping"),
    ],
)
def test_bad_task_files_raise(tmp_path, body, match):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ValueError, match=match):
        load_task_file(path)


def test_duplicate_names_in_a_directory_raise(tmp_path):
    for stem in ("a", "b"):
        (tmp_path / f"{stem}.yaml").write_text("name: same\nsource: builtin:scenes\nscorer: exact_match\n")
    with pytest.raises(ValueError, match="'same'"):
        load_registry(tmp_path)
