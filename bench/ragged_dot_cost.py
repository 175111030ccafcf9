"""What XLA's TPU cost analysis charges for the expert matmul of dropless MoE, and why.

Compiles (never runs), for one compile-only v5p chip (libtpu, no TPU), the grouped matmul
x (M, D) @ w (G, D, F) with G expert groups as `jax.lax.ragged_dot` and as megablox `gmm`
(jax.experimental.pallas.ops.tpu.megablox), forward and the gradients with respect to x and w,
and prints each cost-analysis FLOP count in units of 2 x M x D x F (one dense pass over the rows).

Measured with jax 0.10.2 / libtpu 0.0.42 (M=8192, D=1024, F=2048, G=8):
  ragged_dot forward 1.00, d/dx 1.00, d/dw 8.01: the weight gradient compiles to a dense masked
  batched matmul over all G groups and all M rows (G x the useful work, really executed);
  megablox gmm forward 1.00, d/dx 1.00, d/dw 1.00.
The forward kernels have a data-dependent grid (they visit only the row tiles the groups fill),
but cost analysis charges every row of the buffer; `podtrain plan` corrects that part.

    PYTHONPATH=. python bench/ragged_dot_cost.py [--rows 8192 --d 1024 --f 2048 --groups 8]
"""

import argparse

from podtrain.plan import topology


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--f", type=int, default=2048)
    p.add_argument("--groups", type=int, default=8)
    a = p.parse_args()
    dev = topology.devices(topology.parse("v5p-8"))[0]

    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

    def spec(*shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.SingleDeviceSharding(dev))

    args = (spec(a.rows, a.d), spec(a.groups, a.d, a.f), spec(a.groups, dtype=jnp.int32))
    unit = 2 * a.rows * a.d * a.f
    impls = {
        "lax.ragged_dot": lambda x, w, g: jax.lax.ragged_dot(x, w, g, preferred_element_type=jnp.float32),
        "megablox gmm": lambda x, w, g: megablox.gmm(x, w, g, preferred_element_type=jnp.float32),
    }
    for name, mm in impls.items():

        def loss(x, w, g, mm=mm):
            return mm(x, w, g).sum()

        parts = {"forward": mm, "d/dx": jax.grad(loss, argnums=0), "d/dw": jax.grad(loss, argnums=1)}
        row = []
        for part, fn in parts.items():
            cost = jax.jit(fn).lower(*args).compile().cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            row.append(f"{part} {cost['flops'] / unit:.2f}")
        print(f"{name:<16} " + ", ".join(row) + "  (x 2*M*D*F)")


if __name__ == "__main__":
    main()
