"""Programs compiled on this CPU host for accelerators it does not have (libtpu, compile-only).

Code paths follow the platform a program is compiled for, never the host's default backend: a model
built for a TPU mesh holds `lax` convolutions, one built for a CPU the Winograd matmuls. `plan` compiles
every stage for a small TPU topology at tiny shapes.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from tests.conftest import tiny_config
from wmdd_jax import sharding
from wmdd_jax.models import create_model

pytest.importorskip("libtpu")


def _topology(name, **kwargs):
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another test process may hold libtpu
    return topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices


def _mesh(devices):
    return sharding.make_mesh(ml_collections.ConfigDict(dict(shape=(-1,), axes=("classes",))), devices)


def _training_step_text(model, mesh) -> str:
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("classes"))
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), variables)
    x = jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32, sharding=split)

    def grads(v, x):
        loss = lambda p: model.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"])[0].sum()  # noqa
        return jax.grad(loss)(v["params"])

    return jax.jit(grads).lower(abstract, x).as_text()


@pytest.mark.parametrize("name", ["resnet18", "convnet3"])
def test_a_model_compiled_for_a_tpu_holds_convolutions(name):
    mesh = _mesh(_topology("v5e:2x2"))
    assert sharding.mesh_platform(mesh) == "tpu" and jax.default_backend() == "cpu"
    options = dict(stem="small") if name == "resnet18" else dict(norm="batch", width=8)
    tpu = _training_step_text(create_model(name, 10, platform=sharding.mesh_platform(mesh), **options), mesh)
    assert tpu.count("stablehlo.convolution") > 0
    # The same model for the host's CPU takes the Winograd path: no convolution at all.
    cpu = _training_step_text(create_model(name, 10, platform="cpu", **options), mesh)
    assert cpu.count("stablehlo.convolution") == 0 and cpu.count("stablehlo.dot_general") > tpu.count(
        "stablehlo.dot_general")


def test_meshes_of_two_devices_per_chip():
    """TPU v4 outside megacore mode: two devices per chip, which jax.make_mesh refuses."""
    devices = _topology("v4:2x2x1")
    mesh = _mesh(devices)
    assert mesh.size == len(devices) == 8
    cores = [(tuple(d.coords), d.core_on_chip) for d in mesh.devices.flat]
    assert cores[0][0] == cores[1][0] and cores[0][1] != cores[1][1]  # a chip's two cores side by side
    assert _mesh(_topology("v4:2x2x1", chip_config_name="megacore")).size == 4


def test_plan_compiles_every_stage_for_a_tpu(tmp_path, monkeypatch):
    from wmdd_jax import plan as plan_module

    config = tiny_config()
    config.synthesis.iterations = 10
    config.barycenter.max_features_per_class = 50
    config.eval.label_modes = ("hard", "soft")
    config.eval.seeds = (0, 1, 2)  # 3 seeds of batch 20 on 8 chips: a 2 x 4 grid, the seeds padded to 4
    records = plan_module.plan(config, str(tmp_path), "tpu:v5e:2x4")
    stages = [r["stage"] for r in records]
    assert stages == ["pretrain", "statistics", "barycenter", "recover", "relabel", "evaluate", "evaluate"]
    assert all(r["compiled"] and r["fits"] for r in records), records
    for r in records:
        assert 0 < r["per_device_bytes"] < r["device_memory_bytes"] == 16 * 2**30
        assert r["flops_per_step"] > 0 and r["estimated_seconds"] > 0
    assert all(r["layout"].startswith("grid on 8 devices") for r in records if r["stage"] == "evaluate")
    saved = json.load(open(tmp_path / "plan.json"))
    assert [r["stage"] for r in saved] == stages
    assert plan_module.not_fitting(records) == []
    # A device too small: every stage is named with what to change.
    small = [dict(r, device_memory_bytes=1024, fits=False) for r in records]
    lines = plan_module.not_fitting(small)
    assert len(lines) == len(records) and "synthesis.chunk_images" in lines[3]


def test_plan_rejects_unknown_targets(tmp_path):
    from wmdd_jax.errors import UserError
    from wmdd_jax.plan import parse_target

    for bad in ("tpu:v9:2x2", "gpu:h100", "gpu:z80:8", "cpu:x", "abc"):
        with pytest.raises(UserError):
            parse_target(bad)
    assert parse_target("cpu:1").platform == "cpu"


def test_the_command_line_exits_3_with_a_line_per_stage_that_does_not_fit(monkeypatch, capsys, tmp_path):
    from wmdd_jax import main, plan

    record = dict(stage="recover", program="recover", target="tpu:v5e:2x2", compiled=True, fits=False,
                  per_device_bytes=40 * 2**30, device_memory_bytes=16 * 2**30)
    fits = dict(record, stage="pretrain", program="pretrain", fits=True, per_device_bytes=2**30)
    monkeypatch.setattr(plan, "plan", lambda config, workdir, target: [fits, record])
    with pytest.raises(SystemExit) as stop:
        main._plan(tiny_config(), str(tmp_path), "tpu:v5e:2x2")
    assert stop.value.code == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["wmdd_jax: does not fit: recover: needs 40.0 GiB per device of 16.0 GiB: lower "
                     "--config.synthesis.chunk_images (images per forward/backward chunk) or use more devices"]
    monkeypatch.setattr(plan, "plan", lambda config, workdir, target: [fits])
    main._plan(tiny_config(), str(tmp_path), "tpu:v5e:2x2")  # all fit: returns, exit 0
