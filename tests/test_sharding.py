"""Scale: sharded fits and evaluation on 8 fake CPU devices (conftest), resume from
sharded checkpoints, bad meshes, bfloat16, and Llama-3 8B/70B built shape-only."""

import json
import runpy
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import ppn
from ppn import bayes, cli, gates, sharding
from ppn.fit import FitConfig, fit
from ppn.harness import arguments
from ppn.units import Units
from ppn.models.config import LlamaConfig
from ppn.models.llama import Llama
from ppn.testing import random_plan, run_killed_at, smoke_fit_config, tiny_model, tiny_tokens

TOKENS = tiny_tokens()
# init="prior": the Taylor init's sharded pass is tested on its own (test_sharded_taylor_importances...)
CFG = smoke_fit_config(steps=3, batch_size=8, checkpoint_every=2, init="prior")
MESHES = [(8, 1), (2, 4), (1, 8)]  # (data, fsdp)


def _mesh(shape):
    return sharding.make_mesh({"data": shape[0], "fsdp": shape[1]})


def _assert_same_fit(a, b):
    """Two fits agree to float32 round-off (reductions run in another order on a mesh).

    A guide parameter whose gradient is near zero (the mean of delta, which no gate sees) takes Adam steps of
    about +-lr_gates that nearly cancel, and round-off moves where they cancel; so its
    absolute tolerance is a thousandth of one such step. A sharding bug moves a
    parameter by whole steps. The weights' Adam steps (lr_weights) behave alike: their
    tolerance is a twentieth of one.
    """
    np.testing.assert_allclose([r["loss"] for r in a.metrics], [r["loss"] for r in b.metrics], rtol=1e-5)
    for k, v in a.guide_params.items():
        np.testing.assert_allclose(b.guide_params[k], v, rtol=1e-4, atol=1e-3 * CFG.lr_gates, err_msg=k)
    for x, y in zip(jax.tree.leaves(nnx.state(a.model)), jax.tree.leaves(nnx.state(b.model))):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=5e-2 * CFG.lr_weights)


@pytest.fixture(scope="module")
def reference():
    """The single-device fit every sharded one is compared with."""
    return fit(tiny_model(), TOKENS, CFG, progress=False)


def test_the_session_has_eight_devices():
    assert len(jax.devices()) == 8, "tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8"


# -------------------------------------------------------------------- fit
def test_data_parallel_fit_equals_the_single_device_fit_and_compiles_once(reference, monkeypatch):
    traces = []
    original = bayes.push_puppet_model

    def counting(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(bayes, "push_puppet_model", counting)
    mesh = _mesh((8, 1))
    result = fit(tiny_model(), TOKENS, CFG, progress=False, mesh=mesh)
    assert len(traces) <= 5  # as on one device (tests/test_fit.py): not growing with the steps
    _assert_same_fit(reference, result)
    assert result.model.embed.get_value().sharding == NamedSharding(mesh, PartitionSpec())
    assert all(isinstance(v, np.ndarray) for v in result.guide_params.values())


def test_fsdp_run_killed_on_one_mesh_resumes_on_another_equal_to_the_single_device_fit(reference, tmp_path):
    """Steps 0-1 run on data=2,fsdp=4 and are checkpointed (state split 4 ways), the
    run is killed, and step 2 runs on fsdp=8 from that checkpoint read back 8 ways."""
    # the fit's stream (not Taylor's): killed before step 2
    run_killed_at(2, lambda: fit(tiny_model(), TOKENS, CFG, run_dir=tmp_path / "run", progress=False,
                                 mesh=_mesh((2, 4))), seed=CFG.seed)
    mesh = _mesh((1, 8))
    resumed = fit(tiny_model(), TOKENS, CFG, run_dir=tmp_path / "run", progress=False, mesh=mesh)
    assert [r["step"] for r in resumed.metrics] == list(range(CFG.steps))
    _assert_same_fit(reference, resumed)
    q = resumed.model.blocks[0].attn.q.get_value()  # (N, H, D) = (4, 8, 32): D is the largest dim 8 divides
    assert q.sharding == NamedSharding(mesh, PartitionSpec(None, None, "fsdp"))


def test_the_quality_options_fit_sharded_equal_to_one_device():
    """A frozen teacher (FSDP-sharded like the weights), a size per sequence and
    rescaling: the same fit on data=2, fsdp=4 as on one device."""
    cfg = FitConfig(**{**CFG.__dict__, "teacher": "start", "teacher_weight": 0.5, "size_sampling": "sequence",
                       "rescale": True})
    single = fit(tiny_model(), TOKENS, cfg, progress=False)
    sharded = fit(tiny_model(), TOKENS, cfg, progress=False, mesh=_mesh((2, 4)))
    assert len(sharded.metrics[0]["sizes"]) == cfg.batch_size and "rescale_head" in sharded.guide_params
    _assert_same_fit(single, sharded)


# ------------------------------------------------------------- perplexity
def test_sharded_perplexity_equals_single_device():
    model = tiny_model()
    tokens = np.random.default_rng(1).integers(0, 97, 13 * 64)  # 13 windows: the last batch is padded
    gates = random_plan(model.config).soft_gates(0.5)
    for shape, g in zip(MESHES, (None, gates, None)):
        expected = ppn.perplexity(model, tokens, seqlen=64, progress=False, gates=g)
        got = ppn.perplexity(model, tokens, seqlen=64, progress=False, gates=g, mesh=_mesh(shape))
        assert (got.num_windows, got.num_tokens) == (expected.num_windows, expected.num_tokens)
        np.testing.assert_allclose(got.perplexity, expected.perplexity, rtol=1e-6, err_msg=str(shape))


def test_sharded_taylor_importances_equal_single_device():
    from ppn.start import gate_gradients

    model, units = tiny_model(), Units(tiny_model().config, 16)
    batches = [TOKENS[:136].reshape(8, 17), TOKENS[136:272].reshape(8, 17)]
    expected = gate_gradients(model, units, batches)
    got = gate_gradients(model, units, batches, mesh=_mesh((2, 4)))
    for k, v in expected.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-7, err_msg=k)


# -------------------------------------------------------------- bad input
def test_bad_meshes_are_refused_before_any_compilation(tmp_path, monkeypatch):
    traced = []
    monkeypatch.setattr(bayes, "push_puppet_model", lambda *a, **k: traced.append(1))
    with pytest.raises(ValueError, match="batch_size 6 must be a multiple of the mesh's data x fsdp = 4"):
        fit(tiny_model(), TOKENS, FitConfig(batch_size=6), run_dir=tmp_path / "r", mesh=_mesh((4, 1)))
    devices = np.asarray(jax.devices()).reshape(2, 4)
    with pytest.raises(ValueError, match="mesh axis 'model' does not exist"):
        fit(tiny_model(), TOKENS, CFG, run_dir=tmp_path / "r", mesh=Mesh(devices, ("data", "model")))
    with pytest.raises(ValueError, match="must be AxisType.Auto"):
        fit(tiny_model(), TOKENS, CFG, run_dir=tmp_path / "r", mesh=jax.make_mesh((2, 4), ("data", "fsdp")))
    with pytest.raises(ValueError, match="needs 16 devices; 8 available"):
        sharding.make_mesh("data=2,fsdp=8")
    with pytest.raises(ValueError, match="unknown axis 'tensor'"):
        sharding.make_mesh("data=2,tensor=4")
    with pytest.raises(ValueError, match="expected AXIS=SIZE"):
        sharding.make_mesh("data:2")
    assert not traced and not (tmp_path / "r").exists()
    with pytest.raises(SystemExit):  # argparse checks --mesh's syntax
        cli.build_parser().parse_args(["fit", "--mesh", "data=two"])


def test_fit_flags_reach_the_job_config():
    args = cli.build_parser().parse_args(["fit", "--mesh", "data=2,fsdp=4", "--dtype", "bfloat16", "--distributed"])
    job = arguments.job_config(args)
    assert (job.mesh, job.dtype, args.distributed) == ("data=2,fsdp=4", "bfloat16", True)
    bench = arguments.bench_config(cli.build_parser().parse_args(["bench", "--smoke", "--mesh", "fsdp=8",
                                                            "--dtype", "bfloat16"]))
    assert (bench.mesh, bench.dtype) == ("fsdp=8", "bfloat16")


# -------------------------------------------------------------- precision
def test_bfloat16_network_keeps_gates_offset_and_likelihood_in_float32():
    model = tiny_model(dtype=jnp.bfloat16)
    units = Units(model.config, 16)

    def sites(batch):  # traced shape-only: dtypes without running anything
        with numpyro.handlers.seed(rng_seed=1):
            tr = numpyro.handlers.trace(bayes.push_puppet_model).get_trace(
                batch, jnp.float32(0.5), jnp.float32(0.5), network=model, units=units, data_tokens=4000)
        return {k: s["value"] for k, s in tr.items()
                if s["type"] in ("sample", "param", "mutable") and not s.get("is_observed")}

    out = jax.eval_shape(sites, jax.ShapeDtypeStruct((2, 17), jnp.int32))
    weights = out.pop("llama$params")
    metrics = out.pop("ppn$metrics")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(weights))
    assert {k: v.dtype for k, v in metrics.items()} == dict.fromkeys(
        ("expected_size", "nll", "offset", "teacher_kl"), jnp.float32)
    assert all(v.dtype == jnp.float32 for v in out.values())  # every gate latent


def test_bfloat16_fit_updates_float32_master_weights():
    # The norms start at 1.0, where bfloat16's spacing is 2**-7: an Adam step of
    # 1e-3 rounds away in bfloat16, so they move only through float32 masters.
    model = tiny_model(dtype=jnp.bfloat16)
    cfg = smoke_fit_config(steps=12, lr_weights=1e-3, init="prior")
    fitted = fit(model, TOKENS, cfg, progress=False).model
    assert fitted.dtype == jnp.bfloat16
    norms = np.concatenate([np.asarray(b.input_norm.weight[...], np.float32) for b in fitted.blocks])
    assert (norms != 1.0).mean() > 0.3


def test_precision_experiment_smoke(tmp_path, monkeypatch):
    script = Path(__file__).resolve().parents[1] / "experiments" / "precision.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--smoke", "--out-dir", str(tmp_path)])
    runpy.run_path(str(script), run_name="__main__")  # in this process: its compilations are already warm
    rows = json.loads((tmp_path / "precision_smoke.json").read_text())["records"]
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    assert rows[1]["weight_bytes"] * 2 == rows[0]["weight_bytes"]
    assert abs(rows[1]["perplexity_ratio"] - 1) < 0.01 and 0 <= rows[1]["kl_per_token"] < 1e-3
    assert 0 <= rows[1]["frozen_fraction_at_lr"] <= 1


# ------------------------------------------------------- shapes at scale
LLAMA3 = {  # the published config.json of Meta-Llama-3-8B and -70B
    "8B": (LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                       num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
                       bos_token_id=128000, eos_token_id=128001), 8_030_261_248),
    "70B": (LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                        num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
                        bos_token_id=128000, eos_token_id=128001), 70_553_706_496),
}


@pytest.mark.parametrize("name", LLAMA3)
def test_llama3_gated_model_and_units_shape_only(name):
    config, total = LLAMA3[name]
    d, f, v, h = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    n, k = config.num_heads, config.num_kv_heads
    block = 2 * d + (2 * n + 2 * k) * h * d + 3 * d * f  # two norms, q o k v, gate up down
    assert 2 * v * d + d + config.num_layers * block == total  # untied head, final norm

    model = nnx.eval_shape(lambda: Llama(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)
    assert sum(x.size for x in jax.tree.leaves(params)) == total == config.num_params()
    units = Units(config, 128)
    assert units.total == config.num_layers * block == units.full().num_params()
    assert units.num_gates == config.num_layers * (2 + n + f // 128)

    z = {kind: jnp.ones(shape) for kind, shape in units.gate_shapes().items()}
    size = jax.eval_shape(lambda: bayes.expected_size(units, z))
    assert size.shape == () and size.dtype == jnp.float32
    if name == "8B":  # the gated forward pass, traced shape-only (70B would only take longer)
        ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
        logits = jax.eval_shape(lambda p, i: nnx.merge(graphdef, p)(i, gates=gates.block_gates(units, z)),
                                params, ids)
        assert (logits.shape, logits.dtype) == ((2, 16, v), jnp.float32)

    # FSDP over 8 devices: every weight splits, so each device holds exactly 1/8
    layout = sharding.weight_shardings(params, sharding.make_mesh("fsdp=8"))
    per_device = sum(int(np.prod(s.shard_shape(x.shape))) for x, s in zip(jax.tree.leaves(params),
                                                                          jax.tree.leaves(layout)))
    assert per_device * 8 == total
