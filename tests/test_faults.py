"""Crashes lose nothing: kill -9 then --resume gives the uninterrupted adapter; Ctrl-C checkpoints and exits 130."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import SAMPLES, small_recipe

from mistral_sov.errors import Interrupted
from mistral_sov.recipe import load_recipe
from mistral_sov.train.pipeline import finetune
from mistral_sov.trust.hashing import sha256_file

STEPS = dict(max_steps=12, save_steps=4, logging_steps=1)


def recipe_at(tiny_model, tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(small_recipe(tiny_model, tmp_path / name, **STEPS)))
    return path


@pytest.fixture(scope="module")
def uninterrupted_digest(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    finetune(load_recipe(recipe_at(tiny_model, tmp, "straight")))
    return sha256_file(tmp / "straight" / "adapter" / "adapter_model.safetensors")


def test_kill_9_then_resume_gives_the_same_adapter(tiny_model, tmp_path, uninterrupted_digest, cli):
    path = recipe_at(tiny_model, tmp_path, "killed")
    driver = (
        "import os, signal\n"
        "from mistral_sov.train.pipeline import finetune\n"
        "from mistral_sov.recipe import load_recipe\n"
        "def on_event(kind, payload):\n"
        "    if kind == 'step' and payload['step'] == 7:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"finetune(load_recipe({str(path)!r}), on_event=on_event)\n"
    )
    done = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-1000:]
    assert not (tmp_path / "killed").exists()
    assert (tmp_path / "killed.partial" / "checkpoints" / "checkpoint-4").is_dir()

    result = cli("finetune", path, "--resume", "--json")
    assert result.exit_code == 0, result.output
    digest = sha256_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert digest == uninterrupted_digest


def test_ctrl_c_checkpoints_and_exits_130(tiny_model, tmp_path, uninterrupted_digest, cli):
    path = recipe_at(tiny_model, tmp_path, "stopped")
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job

    def press_ctrl_c(kind, payload):
        if kind == "step" and payload["step"] == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as err:
        finetune(load_recipe(path), on_event=press_ctrl_c)
    assert err.value.exit_code == 130 and "interrupted at step 6" in err.value.message
    assert (tmp_path / "stopped.partial" / "checkpoints" / "checkpoint-6" / "trainer_state.json").is_file()
    assert not (tmp_path / "stopped").exists()
    assert signal.getsignal(signal.SIGINT) is before  # handler restored

    result = cli("finetune", path, "--resume")
    assert result.exit_code == 0, result.output
    assert sha256_file(tmp_path / "stopped" / "adapter" / "adapter_model.safetensors") == uninterrupted_digest


def test_a_checkpoint_half_removed_by_a_kill_never_costs_the_one_resume_needs(tiny_model, tmp_path,
                                                                             uninterrupted_digest):
    """CI saw it: a kill while the Trainer removed checkpoint-2 left it with its marker and a newer folder mtime; the
    Trainer's rotation (by mtime) then deleted checkpoint-4, and the next --resume crashed on the half-removed one."""
    from mistral_sov.train.checkpoints import is_complete, resume_point

    path = recipe_at(tiny_model, tmp_path, "halved")

    def press_ctrl_c(kind, payload):
        if kind == "step" and payload["step"] == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        finetune(load_recipe(path), on_event=press_ctrl_c)
    checkpoints = tmp_path / "halved.partial" / "checkpoints"
    half = checkpoints / "checkpoint-4"
    for name in ("optimizer.pt", "scheduler.pt"):  # removed first; the marker and the weights not yet
        (half / name).unlink()
    now = time.time()
    os.utime(checkpoints / "checkpoint-6", (now - 60, now - 60))  # the removal touched checkpoint-4 last
    assert not is_complete(half) and resume_point(checkpoints).name == "checkpoint-6"

    seen = []

    def look(kind, payload):
        if kind == "step" and payload["step"] == 9:  # after checkpoint-8 was written and the old ones removed
            seen.extend(sorted(p.name for p in checkpoints.iterdir()))
    finetune(load_recipe(path), resume=True, on_event=look)
    assert seen == ["checkpoint-6", "checkpoint-8"]
    assert sha256_file(tmp_path / "halved" / "adapter" / "adapter_model.safetensors") == uninterrupted_digest


def test_save_total_limit_keeps_the_newest_complete_checkpoints_by_step_not_by_mtime(tmp_path):
    from mistral_sov.train.checkpoints import keep_newest, mark_complete

    now = time.time()
    for step, age in ((2, 0), (4, 300), (6, 200), (8, 100)):  # checkpoint-2 touched last, checkpoint-8 unmarked
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if step != 8:
            mark_complete(folder)
        os.utime(folder, (now - age, now - age))
    keep_newest(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    keep_newest(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-8"]


def test_unwritable_output_is_a_clear_error(cli, write_recipe, tiny_model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = cli("finetune", write_recipe(small_recipe(tiny_model, blocker / "out")))
    assert result.exit_code == 3
    assert "output.dir: cannot create" in result.stderr and "Traceback" not in result.stderr


# --- SIGKILL at 20 random instants -------------------------------------------------------------------------------
# One server process imports torch, transformers and msov once and runs no torch op; every attempt is a fork of it
# (milliseconds, not a fresh interpreter). The child reports what it is doing on a pipe; the server SIGKILLs it a
# seeded-random delay after a chosen event (any time after the start, the start of a checkpoint write, or the start of
# the adapter/publish writes), so kills land in every phase, not only between steps.
KILL_STEPS = dict(max_steps=6, save_steps=2, logging_steps=1)
KILLS, CHAINS, SEED = 20, 4, 12
ANCHORS = ["save", "start", "export", "save", "start"]  # per chain: the phase is fixed, the instant in it random


def _child(request: dict, report: int) -> int:
    import torch
    from transformers import Trainer  # imported by the server already: this is a lookup

    from mistral_sov.errors import MsovError
    from mistral_sov.train import trainer as training

    os.dup2(2, 1)  # the server's stdout is its answer channel
    torch.set_num_threads(1)
    clock = time.monotonic()

    def emit(name: str) -> None:
        os.write(report, f"{name} {time.monotonic() - clock:.4f}\n".encode())

    # Observation only, in this child only: the start of a checkpoint write and the moment it is marked complete.
    save, mark = Trainer._save_checkpoint, training.mark_complete
    Trainer._save_checkpoint = lambda self, *a, **k: (emit("save"), save(self, *a, **k))[1]
    training.mark_complete = lambda folder: (mark(folder), emit("saved"))[0]

    def on_event(kind, payload):
        if kind == "stage" and payload["text"] == "saving adapter":
            emit("export")
    try:
        finetune(load_recipe(request["recipe"]), resume=request["resume"], overwrite=request["overwrite"],
                 on_event=on_event)
    except MsovError as err:
        os.write(report, f"error {err.message}\n".encode())
        return err.exit_code
    except Exception as exc:  # noqa: BLE001 - the story must say what broke; os._exit would swallow the traceback
        import traceback
        text = "".join(traceback.format_exception(exc)).replace("\n", " | ")
        os.write(report, f"crash {text}\n".encode())
        return 1
    emit("done")
    return 0


def serve() -> None:
    """One JSON request per stdin line -> one JSON answer per stdout line (exit status, the events and their times)."""
    import select

    import matplotlib.pyplot  # noqa: F401 - imported once here, not in every child (the loss plot)
    import peft  # noqa: F401
    from transformers import Trainer  # noqa: F401 - transformers imports it lazily, in about a second

    import mistral_sov.evaluate  # noqa: F401
    import mistral_sov.model.load  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            code = 1
            try:
                code = _child(request, write_end)
            finally:
                os._exit(code)
        os.close(write_end)
        started, events, buffer, killed_at = time.monotonic(), [], b"", None
        anchor, nth, delay = request.get("anchor"), request.get("nth", 1), request.get("delay", 0.0)
        deadline = started + delay if anchor == "start" else None
        while True:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
            ready, _, _ = select.select([read_end], [], [], timeout)
            if not ready:  # the kill instant
                killed_at = time.monotonic() - started
                os.kill(pid, signal.SIGKILL)
                deadline = None
                continue
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                name, _, rest = raw.decode().partition(" ")
                events.append([name, rest])
                if anchor == name and killed_at is None and deadline is None:
                    nth -= 1
                    if nth == 0:
                        deadline = time.monotonic() + delay
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"rc": code, "killed_at": killed_at, "events": events}), flush=True)


@pytest.fixture(scope="module")
def attempt(tmp_path_factory):
    """One attempt in a fork of the server: attempt(recipe=..., resume=..., overwrite=..., anchor=..., delay=...)."""
    log = tmp_path_factory.mktemp("server") / "stderr.txt"
    tests = str(Path(__file__).resolve().parent)
    with open(log, "w") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {tests!r}); import test_faults as t; t.serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})

    def ask(**request) -> dict:
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        answer = server.stdout.readline()
        assert answer, "the fork server died: " + log.read_text()[-3000:]
        return json.loads(answer)

    yield ask
    server.stdin.close()
    server.wait(timeout=60)


PHASES = {None: "before the first checkpoint", "save": "inside a checkpoint write", "saved": "training",
          "export": "inside the adapter/run.json/publish writes", "done": "after the publish"}


def test_sigkill_at_20_random_instants_then_resume_gives_the_uninterrupted_adapter(tiny_model, tmp_path, attempt):
    from mistral_sov.train.checkpoints import checkpoint_step, resume_point

    def adapter_digest(run: Path) -> str:
        return sha256_file(run / "adapter" / "adapter_model.safetensors")

    rows = tmp_path / "train.jsonl"  # what 6 steps of 8 read: less to scan and tokenise in every attempt
    rows.write_text("".join((SAMPLES / "helpdesk_chat.jsonl").read_text().splitlines(keepends=True)[:48]))

    def recipe(name: str) -> Path:
        data = small_recipe(tiny_model, tmp_path / name, **KILL_STEPS)
        data["data"] = {"train": [{"path": str(rows), "format": "chat"}], "eval": []}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    straight = attempt(recipe=str(recipe("straight")), resume=False, overwrite=False)
    assert straight["rc"] == 0, straight
    expected = adapter_digest(tmp_path / "straight")
    at = [(name, float(t)) for name, t in straight["events"] if name not in ("error", "crash")]
    total = dict(at)["done"]
    save_window = max(b[1] - a[1] for a, b in zip(at, at[1:]) if a[0] == "save" and b[0] == "saved")
    export_window = total - dict(at)["export"]

    rng, story, landed = random.Random(SEED), [], {}
    for chain in range(CHAINS):
        path, out = recipe(f"chain{chain}"), tmp_path / f"chain{chain}"
        work, kills = out.with_name(out.name + ".partial"), 0
        for _ in range(3 * KILLS // CHAINS):
            resume = work.exists()  # what a user would do: --resume an unfinished run, rerun a finished one
            plan = {}
            if kills < KILLS // CHAINS:
                done = resume_point(work / "checkpoints") if resume else None
                steps_left = KILL_STEPS["max_steps"] - (checkpoint_step(done) if done else 0)
                saves_left = steps_left // KILL_STEPS["save_steps"]
                anchor = ANCHORS[kills] if saves_left or ANCHORS[kills] != "save" else "export"
                window = {"start": total, "save": save_window, "export": export_window}[anchor]
                plan = {"anchor": anchor, "nth": rng.randint(1, max(saves_left, 1)), "delay": rng.uniform(0, window)}
            answer = attempt(recipe=str(path), resume=resume, overwrite=out.exists() and not resume, **plan)
            last = next((name for name, _ in reversed(answer["events"]) if name in PHASES), None)
            phase = PHASES[last] if answer["rc"] == -signal.SIGKILL else "ran to the end"
            story.append(f"chain {chain} {'resume' if resume else 'start'} {plan or 'no kill'}: rc {answer['rc']}, "
                         f"killed at {answer['killed_at']}, {phase}, events {answer['events']}")
            if answer["rc"] == -signal.SIGKILL:
                kills += 1
                landed[phase] = landed.get(phase, 0) + 1
            else:
                assert answer["rc"] == 0, "\n".join(story)
            if out.exists():  # only ever a whole run: published after its adapter and run.json
                assert json.loads((out / "run.json").read_text())["status"] == "complete", "\n".join(story)
                assert adapter_digest(out) == expected, "\n".join(story)
            if not plan and answer["rc"] == 0:
                break
        else:
            pytest.fail("a chain did not finish:\n" + "\n".join(story))
    assert sum(landed.values()) == KILLS, "\n".join(story)
    assert landed.get(PHASES["save"], 0) >= 3 and landed.get(PHASES["export"], 0) >= 2, (landed, "\n".join(story))
    print(landed)
