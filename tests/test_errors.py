"""A user's mistake ends every command with one line `error: ...` and exit status 2, never a traceback.

Each case runs the real command line in a subprocess. docs/errors.md is the table of these cases with the messages the
commands print; `python tests/test_errors.py` rewrites it, and each test checks its row is there, as printed.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs", "errors.md")
ELSEWHERE = "## Tested in their own files"
TRAIN, SCRIPT, CLI = "python -m diffusers_memcontrol.train", "python training/train_memcontrol.py", "memcontrol"
COMMANDS = {TRAIN: [sys.executable, "-m", "diffusers_memcontrol.train"],
            SCRIPT: [sys.executable, os.path.join(ROOT, "training", "train_memcontrol.py")],
            CLI: [sys.executable, "-m", "diffusers_memcontrol.cli"]}
NO_TRAINING = ["--max_train_steps", "1", "--max_train_samples", "8", "--train_batch_size", "4", "--report_to",
               "none", "--no_progress", "--num_validation_images", "0"]


def _xformers_missing() -> bool:
    from diffusers.utils import is_xformers_available

    return not is_xformers_available()


# (what the user got wrong, command, arguments (DATA = the folder of the test data), a part of the expected message)
CASES = [
    ("a column that is not in the dataset", TRAIN, ["--caption_column", "caption"],
     "Column(s) ['caption'] not found"),
    ("a mask of the wrong length", TRAIN, ["--mask", "101"], "3 bits"),
    ("a mask made for another UNet", TRAIN, ["--mask", "DATA/foreign_mask.json"], "positions"),
    ("an adapter trained for another base model", TRAIN, ["--eval", "--adapter_dir", "DATA/foreign_adapter"],
     "trained for another base model"),
    ("a data folder that does not exist", TRAIN, ["--train_data_dir", "DATA/no_such_folder"], "does not exist"),
    ("an image file that is not an image", TRAIN, ["--train_data_dir", "DATA/bad_images.csv", "--image_column",
                                                   "path", "--caption_column", "report"],
     "not a readable image file"),
    ("an image file truncated halfway", TRAIN, ["--train_data_dir", "DATA/truncated.csv", "--image_column", "path",
                                                "--caption_column", "report"], "image file is truncated"),
    ("a metadata.jsonl with no rows", TRAIN, ["--train_data_dir", "DATA/no_rows"], "has no rows"),
    ("an unknown dataset or domain", TRAIN, ["--dataset_name", "no-such-domain"], "neither a built-in domain"),
    ("an empty dataset", TRAIN, ["--train_data_dir", "DATA/empty.csv", "--image_column", "path",
                                 "--caption_column", "report"], "empty"),
    ("an unknown --dataset_config_name", TRAIN, ["--dataset_name", "DATA/imagenette_like", "--dataset_config_name",
                                                 "320px", "--caption_template", "a photo of a {label}"],
     "'320px' is not a config of 'DATA/imagenette_like'; available: ['160px']"),
    ("a --caption_template naming a missing column", TRAIN, ["--dataset_name", "DATA/imagenette_like",
                                                             "--dataset_config_name", "160px", "--caption_template",
                                                             "a photo of a {class}"],
     "names column(s) ['class'] not in the dataset"),
    ("--dataset_name and --train_data_dir together", TRAIN, ["--dataset_name", "digits", "--train_data_dir",
                                                             "DATA"], "not both"),
    ("a value outside a flag's choices", TRAIN, ["--mask_layout", "rows"], "invalid choice: 'rows'"),
    ("a search flag without --search", TRAIN, ["--n_trials", "3"], "--n_trials is a search flag"),
    ("the whole method asked of the one-fine-tune trainer", TRAIN, ["--search"], "run the whole method"),
    ("an unknown preset", SCRIPT, ["--preset", "nope"], "--preset 'nope': unknown preset"),
    ("a bad --threshold", SCRIPT, ["--threshold", "high"], 'positive number or "auto"'),
    ("an --eval_config file that does not exist", SCRIPT, ["--eval", "--eval_config", "DATA/eval.json"],
     "No such file or directory"),
    ("a storage that is neither a database URL nor a journal file", CLI,
     ["search", "--storage", "DATA/study.txt"], "neither a database URL"),
    ("an unsearchable --search_space", CLI, ["search", "--search_space", "full,lora"],
     "unknown or unsearchable method(s) ['full']"),
    ("a flag that does not exist, in a search", CLI, ["search", "--learning_ratez", "1e-3"],
     "unrecognized arguments: --learning_ratez"),
    ("a misspelt method in --learning_rates", TRAIN, ["--learning_rates", "svdif=1e-2"], "expected METHOD=RATE"),
    ("agreement as the search's quality objective on a domain without an agreement score", TRAIN,
     ["--eval", "--dataset_name", "animal-mnist", "--search_quality_objective", "agreement"],
     "needs an agreement score"),
    ("a mask to transfer that does not exist", CLI, ["transfer", "--mask", "DATA/no_such_mask.json"],
     "not a mask file, folder or Hub repo"),
    ("--gpus_per_trial below 1", CLI, ["search", "--gpus_per_trial", "0"], "--gpus_per_trial must be >= 1"),
    ("stage 2 of a search whose stage 1 has not run", CLI, ["search", "--stage", "2"], "run --stage 1 first"),
]
if _xformers_missing():
    CASES.append(("--enable_xformers_memory_efficient_attention without xformers", TRAIN,
                  ["--enable_xformers_memory_efficient_attention"], "needs xformers, which is not installed"))


def build_data(folder: str) -> None:
    """The inputs the cases name: bad CSVs, an Imagenette-like dataset with one config, foreign mask and adapter."""
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    from diffusers_memcontrol import Mask
    from diffusers_memcontrol.hub.adapters import save_adapter
    from diffusers_memcontrol.trainer.config import FineTuneConfig
    from tests.conftest import make_small_unet

    os.makedirs(folder, exist_ok=True)
    rows = ["path,report"]
    for i in range(8):
        buf = io.BytesIO()
        PILImage.new("RGB", (32, 32), (i * 30, 0, 0)).save(buf, format="PNG")
        with open(os.path.join(folder, f"img{i}.png"), "wb") as f:
            f.write(buf.getvalue() if i == 0 else b"%PDF-1.4 not an image")
        rows.append(f"img{i}.png,report number {i}")
    with open(os.path.join(folder, "bad_images.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    with open(os.path.join(folder, "empty.csv"), "w") as f:
        f.write("path,report\n")
    rows = ["path,report"]
    for i in range(8):  # PNGs cut in half: their headers read, their pixels do not
        data = io.BytesIO()
        PILImage.new("RGB", (32, 32), (0, i * 30, 0)).save(data, format="PNG")
        with open(os.path.join(folder, f"cut{i}.png"), "wb") as f:
            f.write(data.getvalue()[:len(data.getvalue()) // 2])
        rows.append(f"cut{i}.png,report number {i}")
    with open(os.path.join(folder, "truncated.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    os.makedirs(os.path.join(folder, "no_rows"), exist_ok=True)
    PILImage.new("RGB", (32, 32)).save(os.path.join(folder, "no_rows", "img0.png"))
    with open(os.path.join(folder, "no_rows", "metadata.jsonl"), "w") as f:
        f.write("\n")
    images = [PILImage.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(4)]
    features = Features({"image": Image(), "label": ClassLabel(names=["tench", "church"])})
    dataset = Dataset.from_dict({"image": images, "label": [0, 1, 0, 1]}, features=features)
    os.makedirs(os.path.join(folder, "imagenette_like", "160px"), exist_ok=True)
    dataset.to_parquet(os.path.join(folder, "imagenette_like", "160px", "train.parquet"))
    with open(os.path.join(folder, "imagenette_like", "README.md"), "w") as f:
        f.write("---\nconfigs:\n- config_name: 160px\n  data_files:\n  - split: train\n    path: 160px/*.parquet\n---\n")
    Mask("svdiff", "paper", ["mid_block.attentions.9"], [1]).save(os.path.join(folder, "foreign_mask.json"))
    other = make_small_unet()
    other.add_adapter(FineTuneConfig().adapter_config())
    save_adapter(other, os.path.join(folder, "foreign_adapter"))


def run_case(command: str, argv: list[str], data: str, cwd: str) -> subprocess.CompletedProcess:
    """Run one case offline in `cwd`; DATA in `argv` is replaced by the data folder."""
    argv = [a.replace("DATA", data) for a in argv]
    extra = NO_TRAINING if command != CLI else NO_TRAINING[:2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MEMCONTROL_CACHE_DIR": os.path.join(cwd, "cache")}
    return subprocess.run([*COMMANDS[command], *argv, "--output_dir", os.path.join(cwd, "out"), *extra], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def error_line(result: subprocess.CompletedProcess, data: str) -> str:
    """The one `error:` line of a run, with the data folder written DATA."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0].replace(data, "DATA")


def table_row(what: str, command: str, argv: list[str], line: str) -> str:
    """The docs/errors.md row of one case."""
    shown = " ".join(json.dumps(a) if " " in a or "{" in a else a for a in argv)
    return f"| {what} | `{command} {shown}` | `{line.replace('|', '&#124;')}` | 2 |"


def run_all(data: str, work: str) -> list[subprocess.CompletedProcess]:
    """Every case, a few at a time (each is a fresh interpreter that mostly imports), in CASES' order."""
    from concurrent.futures import ThreadPoolExecutor

    def one(index: int) -> subprocess.CompletedProcess:
        folder = os.path.join(work, str(index))
        os.makedirs(folder)
        return run_case(CASES[index][1], CASES[index][2], data, folder)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, range(len(CASES))))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[str, str, list[subprocess.CompletedProcess]]:
    data, work = str(tmp_path_factory.mktemp("error_inputs")), str(tmp_path_factory.mktemp("error_runs"))
    build_data(data)
    return data, work, run_all(data, work)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_a_user_error_is_one_line_and_status_2(runs, index):
    data, work, results = runs
    what, command, argv, message = CASES[index]
    line = error_line(results[index], data)
    assert message in line, line
    assert not os.path.exists(os.path.join(work, str(index), "out", "adapter_model.safetensors"))
    with open(DOCS, encoding="utf-8") as f:
        assert table_row(what, command, argv, line) in f.read(), \
            f"docs/errors.md is out of date for {what!r}: run `python tests/test_errors.py`"


def test_under_accelerate_launch_the_trainer_prints_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(["accelerate", "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "-q", COMMANDS[SCRIPT][1],
                             "--mask_layout", "rows"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    expected = "error: argument --mask_layout: invalid choice: 'rows' (choose from 'blocks', 'attention', 'paper')"
    assert lines == [expected], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.returncode != 0  # accelerate's own status: 1


def _tested_elsewhere() -> list[str]:
    """The section of docs/errors.md after the generated table (errors tested in their own files), kept as it is."""
    with open(DOCS, encoding="utf-8") as f:
        text = f.read()
    at = text.find(ELSEWHERE)
    return [text[at:].rstrip("\n"), ""] if at >= 0 else []


def write_docs() -> None:
    """Run every case and write docs/errors.md."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        build_data(data)
        results = run_all(data, os.path.join(tmp, "runs"))
        rows = [table_row(what, command, argv, error_line(result, data))
                for (what, command, argv, _), result in zip(CASES, results)]
    text = "\n".join([
        "# Errors",
        "",
        ("A user's mistake ends every command with one line `error: ...` on stderr, naming the value and what is "
         "accepted, and exit status 2; no traceback. Programming errors still raise. This table is the cases of "
         "`tests/test_errors.py`, with the lines the commands print (`python tests/test_errors.py` regenerates it; "
         "DATA is the folder of the test inputs; `memcontrol` is also `python -m diffusers_memcontrol.cli`)."),
        "",
        ("Under `accelerate launch` the trainer prints the same line and exits with 2; accelerate's launcher then "
         "reports its child's failure itself: with `accelerate launch -q` it exits with 1 and adds nothing, without "
         "`-q` it adds a `CalledProcessError` traceback of its own."),
        "",
        ("An `error:` line always starts its own line: progress bars still on screen are closed first, and where "
         "stderr is not a terminal (a log file, a pipe) a newline ends the bars' last line. A disk that fills while a "
         "command writes (a checkpoint, an adapter, a publication, an audit or metrics file) is one `error:` line "
         "too, naming the folder, the bytes needed and the bytes free, with exit status 1: nothing is left half "
         "written ([checkpoints.md](checkpoints.md))."),
        "",
        "| input | command | message | exit status |",
        "|---|---|---|---|",
        *rows,
        "",
        *_tested_elsewhere(),
    ])
    from diffusers_memcontrol.files import write_text_atomic

    write_text_atomic(DOCS, text)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    write_docs()
