"""Sharded training (data parallel, FSDP, tensor-parallel attention) equals one device.

Each check runs in a subprocess: on 4 host CPU devices
(--xla_force_host_platform_device_count), so the rest of the suite keeps its single
default device, and, on a machine with 2 or more GPUs, again on all of its GPUs with
the Pallas kernels compiled.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r"""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from flashjax.models import config_from_preset
    from flashjax.mesh import make_mesh
    from flashjax.models.gpt import GPT
    from flashjax.models.train import make_sharded_train_step, make_train_step
    import optax

    n = len(jax.devices())
    assert n >= 2 and n % 2 == 0, jax.devices()
    cfg = config_from_preset("llama-nano", n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=128,
                             vocab_size=97, max_seq_len=32, attention=sys.argv[1], dtype="float32")
    model = GPT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx = optax.adamw(1e-2)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 97, (3, 1, 8, 32)), jnp.int32)
    y = jnp.asarray(rng.integers(0, 97, (3, 1, 8, 32)), jnp.int32)

    def run(step, p, o):
        losses = []
        for i in range(3):
            p, o, m = step(p, o, x[0], y[0])  # one batch: the loss must fall
            losses.append(float(m["loss"]))
        return losses, p

    single, p1 = run(make_train_step(graphdef, tx, donate=False), params, tx.init(params))
    out = {"single": single}
    for name, mesh in [("dp", make_mesh(data=n)),
                       ("dp_fsdp", make_mesh(data=n // 2, fsdp=2)),
                       ("fsdp_tp", make_mesh(data=1, fsdp=n // 2, model=2))]:
        step, p, o = make_sharded_train_step(graphdef, tx, mesh, params, donate=False)
        losses, p = run(step, p, o)
        sharded = [str(a.sharding.spec) for a in jax.tree.leaves(p) if "fsdp" in str(a.sharding.spec)]
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p1)))
        out[name] = {"losses": losses, "n_fsdp_sharded": len(sharded), "param_diff": diff,
                     "compiles": step._cache_size(), "fsdp": mesh.shape["fsdp"]}
    print("RESULT" + json.dumps(out))
""")


def _gpu_count() -> int:
    import jax

    try:
        return len(jax.devices("gpu"))
    except RuntimeError:
        return 0


PLATFORMS = [
    "cpu",
    pytest.param("gpu", marks=pytest.mark.skipif("_gpu_count() < 2", reason="needs 2 or more GPUs")),
]


def _run(script, platform, *args):
    env = dict(os.environ)
    if platform == "cpu":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
        env["JAX_PLATFORMS"] = "cpu"
    else:  # every GPU, fp32 matmuls at full precision like the rest of the suite
        env["JAX_PLATFORMS"] = "cuda"
        env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):])


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("attention", ["flash"])
def test_sharded_training_matches_one_device(attention, platform):
    out = _run(SCRIPT, platform, attention)
    single = out["single"]
    assert single[-1] < single[0]  # it trains
    for name in ("dp", "dp_fsdp", "fsdp_tp"):
        r = out[name]
        assert r["losses"] == pytest.approx(single, rel=2e-5, abs=2e-5), (name, r["losses"], single)
        assert r["param_diff"] < 5e-4, (name, r["param_diff"])  # adam amplifies fp32 reduction-order noise
        assert r["compiles"] == 1, (name, r["compiles"])
    assert out["dp"]["n_fsdp_sharded"] == 0
    assert out["dp_fsdp"]["n_fsdp_sharded"] > 0
    assert (out["fsdp_tp"]["n_fsdp_sharded"] > 0) == (out["fsdp_tp"]["fsdp"] > 1)


GEN_SCRIPT = textwrap.dedent(r"""
    import json, sys
    import jax, numpy as np
    from flax import nnx
    from flashjax.mesh import make_mesh
    from flashjax.models import config_from_preset
    from flashjax.models.gpt import GPT
    from flashjax.serving.generate import generate

    cfg = config_from_preset("llama-nano", n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=128,
                             vocab_size=97, max_seq_len=64, attention=sys.argv[1], dtype="float32")
    model = GPT(cfg, rngs=nnx.Rngs(1))
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    one, n1 = generate(model, prompts, 6, block_size=4)
    mesh = make_mesh(data=1, model=2, devices=jax.devices()[:2])
    two, n2 = generate(model, prompts, 6, block_size=4, mesh=mesh)
    print("RESULT" + json.dumps({"one": one.tolist(), "two": two.tolist(), "n1": n1.tolist(), "n2": n2.tolist()}))
""")


@pytest.mark.parametrize("platform", PLATFORMS)
def test_tensor_parallel_generation_matches_one_device(platform):
    out = _run(GEN_SCRIPT, platform, "xla" if platform == "cpu" else "flash")
    assert out["one"] == out["two"] and out["n1"] == out["n2"], out


@pytest.mark.parametrize("kw,msg", [
    (dict(fsdp=0), "mesh axis fsdp must be >= 1"),
    (dict(model=-1), "mesh axis model must be >= 1"),
    (dict(data=2), r"mesh data\*fsdp\*model = 2\*1\*1 != 1 devices"),
])
def test_make_mesh_rejects_bad_sizes(kw, msg):
    import jax

    from flashjax.mesh import make_mesh

    with pytest.raises(ValueError, match=msg):
        make_mesh(devices=jax.devices()[:1], **kw)


def test_make_mesh_axis_not_dividing_devices():
    import jax

    from flashjax.mesh import make_mesh

    devs = jax.devices()[:1] * 3  # three entries: fsdp=2 cannot divide them
    with pytest.raises(ValueError, match="fsdp\\*model = 2 does not divide the 3 devices"):
        make_mesh(fsdp=2, devices=devs)
