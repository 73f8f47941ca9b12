"""Launch scripts in --dry-run mode (every command they would run), and the entry point's
one-line answers to a config typo and to a bad config value."""

import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry_run(script, *args, env=None):
    out = subprocess.run(["bash", os.path.join(ROOT, "launch", script), "--dry-run", *args],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]


def test_tpu_pod_dry_run_creates_copies_installs_runs_tails_and_deletes():
    cmds = _dry_run("tpu_pod.sh", "my-v4", "us-central2-b", "configs/coatnet0.py",
                    "gs://bucket/run", "--config.batch_size=1024")
    verbs = [c[4] for c in cmds]
    assert all(c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] for c in cmds)
    assert verbs == ["create", "ssh", "scp", "ssh", "ssh", "ssh", "delete"]
    assert all("my-v4" in " ".join(c) and "us-central2-b" in c for c in cmds)
    assert cmds[0][cmds[0].index("--accelerator-type") + 1] == "v4-64"
    assert "--worker=all" in cmds[2] and "hybrid_attn" in " ".join(cmds[2])
    assert "pip install" in cmds[3][-1] and "--worker=all" in cmds[3]
    train = cmds[4][-1]
    assert "--worker=all" in cmds[4]
    assert ("python -m hybrid_attn.main --jax_distributed --config=configs/coatnet0.py "
            "--workdir=gs://bucket/run --config.batch_size=1024") in train
    assert "tail" in cmds[5][-1] and "--worker=0" in cmds[5]
    keep = _dry_run("tpu_pod.sh", "--keep", "my-v4", "z", "c.py", "gs://b/r")
    assert [c[4] for c in keep][-1] != "delete"


def test_gpu_slurm_dry_run_submits_then_runs_one_task_per_node_with_explicit_flags():
    submit = _dry_run("gpu_slurm.sh", "--nodes=2", "configs/coatnet0.py", "/shared/run",
                      "--config.seed=1")
    assert len(submit) == 1 and submit[0][0] == "sbatch"
    assert {"--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--signal=TERM@120",
            "--requeue"} <= set(submit[0])
    assert submit[0][-3:] == ["configs/coatnet0.py", "/shared/run", "--config.seed=1"]
    job = _dry_run("gpu_slurm.sh", "configs/coatnet0.py", "/shared/run", "--config.seed=1",
                   env={"SLURM_JOB_ID": "7", "SLURM_NNODES": "2"})
    assert len(job) == 1 and job[0][:2] == ["srun", "--ntasks=2"]
    inner = shlex.split(job[0][-1])
    assert inner[:4] == ["exec", "python", "-m", "hybrid_attn.main"]
    assert "--jax_distributed" in inner and "--num_processes=2" in inner
    assert "--process_id=$SLURM_PROCID" in inner
    assert any(a.startswith("--coordinator_address=") and a.endswith(":12355") for a in inner)
    assert inner[-3:] == ["--config=configs/coatnet0.py", "--workdir=/shared/run",
                          "--config.seed=1"]


@pytest.fixture(scope="module")
def bad_invocations(tmp_path_factory):
    """``python -m hybrid_attn.main`` with a config typo and with a bad value, both started
    at once (each spends its seconds importing): name -> (exit code, stderr, workdir)."""
    tmp = tmp_path_factory.mktemp("cli")
    cases = {"typo": "--config.optim.learnin_rate=1", "batch_size": "--config.batch_size=0"}
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "hybrid_attn.main", "--config=configs/coatnet0.py:digits",
         override, f"--workdir={tmp / name}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"}) for name, override in cases.items()}
    results = {}
    for name, p in procs.items():
        stderr = p.communicate(timeout=300)[1]
        results[name] = (p.returncode, stderr, tmp / name)
    return results


def test_config_typo_is_one_line_naming_the_key(bad_invocations):
    """Finding 7 (entry point): a typo in an override printed a 59-line traceback."""
    code, stderr, workdir = bad_invocations["typo"]
    assert code == 2
    assert not os.path.exists(workdir / "checkpoints")  # it failed before anything ran
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("Invalid flags:") and "learnin_rate" in lines[-1]
    assert "learning_rate" in lines[-1]
    assert "Traceback" not in stderr


def test_invalid_override_value_is_one_line_without_traceback(bad_invocations):
    """Finding 7 (entry point): a well-formed override with a bad value (batch_size=0) is
    refused by the typed boundary in one line, before anything is built or written."""
    code, stderr, workdir = bad_invocations["batch_size"]
    assert code == 1
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "batch_size" in lines[-1], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not workdir.exists()


def test_explicit_distributed_flags_come_together_or_not_at_all():
    """Finding 5: outside a detected cluster, --jax_distributed died in jax ("Number of
    processes must be defined"). The explicit flags run real processes in
    test_multiprocess; a partial set is refused naming what is missing."""
    from absl import flags
    from absl.testing import flagsaver

    from hybrid_attn import distributed

    was_parsed = flags.FLAGS.is_parsed()
    flags.FLAGS.mark_as_parsed()
    try:
        with flagsaver.flagsaver(jax_distributed=True, num_processes=2):
            with pytest.raises(ValueError, match="also needs --coordinator_address, --process_id"):
                distributed.initialize_from_flags()
        with flagsaver.flagsaver(process_id=1):
            with pytest.raises(ValueError, match="--process_id need --jax_distributed"):
                distributed.initialize_from_flags()
    finally:
        if not was_parsed:
            flags.FLAGS.unparse_flags()


def test_local_launcher_replaces_only_the_fake_device_count():
    from hybrid_attn.launch_local import with_cpu_devices

    flags = "--xla_a=1 --xla_force_host_platform_device_count=8 --xla_b=0"
    assert with_cpu_devices(flags, 2) == \
        "--xla_a=1 --xla_b=0 --xla_force_host_platform_device_count=2"
    assert with_cpu_devices("", 1) == "--xla_force_host_platform_device_count=1"
