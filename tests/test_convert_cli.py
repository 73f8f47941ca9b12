"""Importing timm weights: the name table against timm's own facts, ``from_timm`` on
timm's full-size tensor shapes, the round trip timm state dict -> .safetensors ->
``python -m hybrid_attn.convert`` -> checkpoint -> predictor == timm's logits, and bad
input ending in one line."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import count_scalars
from PIL import Image

from hybrid_attn.convert import __main__ as cli
from hybrid_attn.convert import from_timm, names
from hybrid_attn.models import get_model
from hybrid_attn.predict import Predictor

GOLDENS = pathlib.Path(__file__).parent / "goldens"
WEIGHTS = GOLDENS / "roundtrip_coatnet.safetensors"
IMAGES = [GOLDENS / "roundtrip_landscape.png", GOLDENS / "roundtrip_portrait.png"]


def reduced_overrides() -> str:
    """The reduced CoAtNet's sizes, as the generator built it in timm (JSON)."""
    return str(np.load(GOLDENS / "roundtrip_coatnet.npz")["config"])


def run_cli(*args: str) -> None:
    """``python -m hybrid_attn.convert ARGS`` in this process (flags parsed afresh)."""
    cli.FLAGS.unparse_flags()
    cli.FLAGS(["convert", *args])
    cli.main(["convert"])


def timm_shaped(arch: str) -> dict[str, np.ndarray]:
    """A state dict with every tensor of timm's full-size ``arch`` (constant, no memory)."""
    return {k: np.broadcast_to(np.float32(0.01), v)
            for k, v in names.reference()[arch]["shapes"].items()}


@pytest.mark.slow
@pytest.mark.parametrize("entry", names.TIMM_MODELS, ids=lambda e: e.name)
def test_every_row_builds_timms_parameter_count(entry):
    facts = names.reference()[entry.timm]
    default = facts["pretrained"][facts["default_tag"]]  # timm counts at its default weights
    _, h, w = default["input_size"]
    model = get_model(entry.model, num_classes=default["num_classes"], **entry.overrides)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, h, w, 3)), train=False))
    assert count_scalars(shapes["params"]) == facts["params"]


@pytest.mark.parametrize("arch", ["resnet50", "twins_svt_small", "coatnet_0_224"])
def test_from_timm_takes_every_full_size_tensor(arch):
    model, variables = from_timm(arch, timm_shaped(arch))
    assert model.num_classes == 1000
    assert count_scalars(variables["params"]) == names.reference()[arch]["params"]


def test_another_architecture_names_the_first_mismatching_tensor():
    with pytest.raises(ValueError, match=r"not timm's twins_pcpvt_small: first mismatching "
                       r"tensor patch_embeds\.2\.proj\.weight has shape \(256, 128, 2, 2\) in "
                       r"the checkpoint, \(320, 128, 2, 2\) in twins_pcpvt_small"):
        from_timm("twins_pcpvt_small", timm_shaped("twins_svt_small"))
    with pytest.raises(ValueError, match=r"lacks layer3\.6\.conv1\.weight \(shape "
                       r"\(256, 1024, 1, 1\) in resnet101\)"):
        from_timm("resnet101", timm_shaped("resnet50"))
    extra = {**timm_shaped("resnet50"), "fc2.weight": np.zeros((3, 2), np.float32)}
    with pytest.raises(ValueError, match=r"1 tensors resnet50 does not have, the first "
                       r"fc2\.weight \(shape \(3, 2\)\)"):
        from_timm("resnet50", extra)


def test_unknown_names_list_the_supported_ones():
    with pytest.raises(ValueError, match=r"No importer for timm model 'halonet_xyz'.*"
                       r"coatnet_0_224.*resnet50.*twins_svt_small"):
        from_timm("halonet_xyz", {})
    with pytest.raises(ValueError, match=r"no weights resnet50\.nope; its tags: a1_in1k, "):
        from_timm("resnet50.nope", {})


def test_the_class_count_comes_from_the_classifier():
    sd = timm_shaped("resnet50")
    sd["fc.weight"], sd["fc.bias"] = np.zeros((7, 2048), np.float32), np.zeros(7, np.float32)
    model, variables = from_timm("resnet50.tv_in1k", sd)
    assert model.num_classes == 7 and variables["params"]["head"]["kernel"].shape == (2048, 7)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("import") / "coatnet_roundtrip"
    run_cli("--timm", "coatnet_0_224", "--checkpoint", str(WEIGHTS), "--workdir",
            str(workdir), "--model_overrides", reduced_overrides())
    return workdir


def test_round_trip_gives_timms_logits(converted):
    golden = np.load(GOLDENS / "roundtrip_coatnet.npz")
    predictor = Predictor(str(converted))
    assert predictor.meta["timm_name"] == "coatnet_0_224.untrained"
    assert predictor.meta["model_name"] == "coatnet_0" and predictor.meta["num_classes"] == 1000
    recorded = predictor.meta["preprocessing"]
    timm_cfg = names.preprocessing("coatnet_0_224", "untrained")
    assert recorded == {k: v for k, v in timm_cfg.items() if k != "num_classes"}
    assert recorded["crop_pct"] == 0.95 and recorded["mean"] == [0.5, 0.5, 0.5]
    logits = predictor.logits([Image.open(p) for p in IMAGES])
    np.testing.assert_allclose(logits, golden["logits"], rtol=1e-4, atol=1e-4)


def test_converting_into_a_used_workdir_is_refused(converted, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli("--timm", "coatnet_0_224", "--checkpoint", str(WEIGHTS), "--workdir",
                str(converted), "--model_overrides", reduced_overrides())
    assert e.value.code == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def _bad_inputs(tmp: pathlib.Path) -> dict[str, tuple[list[str], str]]:
    garbage = tmp / "garbage.safetensors"
    garbage.write_bytes(b"this is not a checkpoint")
    pickle = tmp / "model.pth"
    pickle.write_bytes(b"\x80\x04not really")
    other = tmp / "other.bin.txt"
    other.write_text("x")
    return {
        "missing": (["--timm", "resnet50", "--checkpoint", str(tmp / "none.safetensors")],
                    "No checkpoint file at "),
        "not a checkpoint": (["--timm", "resnet50", "--checkpoint", str(garbage)],
                             "is not a readable safetensors file"),
        "no torch": (["--timm", "resnet50", "--checkpoint", str(pickle)],
                     "needs torch (pip install torch), or use the weights' .safetensors"),
        "unknown extension": (["--timm", "resnet50", "--checkpoint", str(other)],
                              "is neither .safetensors nor a PyTorch checkpoint"),
        "unknown name": (["--timm", "halonet_xyz", "--checkpoint", str(WEIGHTS)],
                         "No importer for timm model 'halonet_xyz'"),
        "other architecture": (["--timm", "resnet50", "--checkpoint", str(WEIGHTS)],
                               "not timm's resnet50: it lacks conv1.weight"),
        "bad overrides": (["--timm", "coatnet_0_224", "--checkpoint", str(WEIGHTS),
                           "--model_overrides",
                           json.dumps({**json.loads(reduced_overrides()), "stem_width": 12})],
                          "Converted weights do not fit the model: /"),
    }


@pytest.mark.parametrize("case", ["missing", "not a checkpoint", "no torch",
                                  "unknown extension", "unknown name", "other architecture",
                                  "bad overrides"])
def test_bad_input_is_one_line_and_exit_code_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as on a machine without torch
    args, message = _bad_inputs(tmp_path)[case]
    with pytest.raises(SystemExit) as e:
        run_cli(*args, "--workdir", str(tmp_path / "out"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out" / "checkpoints" / "0").exists()


def test_module_entry_point_fails_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "hybrid_attn.convert", "--timm", "resnet50", "--checkpoint",
         str(tmp_path / "none.safetensors"), "--workdir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"error: No checkpoint file at {tmp_path / 'none.safetensors'}" in result.stderr


def test_evaluation_uses_the_recorded_preprocessing(converted):
    from hybrid_attn import checkpoint
    from hybrid_attn.convert.pretrained import recorded_eval_input
    from hybrid_attn.data.input_pipeline import InputConfig

    meta = checkpoint.load_variables(str(converted / "checkpoints" / "0"))["meta"]
    cfg = recorded_eval_input(InputConfig(image_size=32, crop_pct=1.0), meta)
    assert (cfg.image_size, cfg.crop_pct, cfg.mean, cfg.std) == (224, 0.95, (0.5,) * 3,
                                                                 (0.5,) * 3)
