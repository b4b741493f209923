"""Where a shard group's forward spends its time: GPT-2 small (jobs/models/gpt2_small, seeded)
on one batch of 4 x 48 tokens, unsharded and in a shard group of the launched ranks (lldist's
own evaluation/groups.py: FSDP2 per block, then the root), with its collectives over MPI
(evaluation/collectives.py, as lldist.surface runs them on CPUs) or over gloo.

    mpiexec -n 2 python tools/shard_forward_profile.py            # MPI collectives
    mpiexec -n 2 python tools/shard_forward_profile.py --gloo     # torch's gloo, for comparison

Prints, per rank, the best of 5 forwards unsharded and sharded (the same output, bit for bit,
is checked), and on rank 0 torch.profiler's operators of one sharded forward by self time:
aten::copy_ is FSDP2's copy of the rows into the gather buffer and out of it into each
parameter, FSDP::all_gather the collective itself, aten::addmm/mm the model's matmuls.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gloo", action="store_true", help="gloo's collectives instead of MPI's")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    import torch
    from mpi4py import MPI
    from transformers import AutoConfig, AutoModelForCausalLM

    from lldist.evaluation.groups import GroupSpec, init_process_group, shard_model
    from lldist.transport.runner import MpiLink
    torch.set_num_threads(1)
    world = MpiLink(MPI.COMM_WORLD)
    spec = GroupSpec(world.rank, world.size, "shard")
    init_process_group(spec, lambda obj: world.bcast(obj, 0), "cpu", None if args.gloo else world.dup())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(os.path.join(ROOT, "jobs/models/gpt2_small"))).eval()
    x = torch.randint(0, model.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(1))

    def best(f):
        f()
        times = []
        for _ in range(args.rounds):
            world.barrier()
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.inference_mode():
        ref = model(x).logits
        plain = best(lambda: model(x).logits)
    sharded = shard_model(model, spec, "cpu")
    with torch.no_grad():
        out = sharded(x).logits
        sharded.reshard()
        same = torch.equal(out, ref)
        fsdp = best(lambda: (sharded(x).logits, sharded.reshard()))
        from torch.profiler import profile
        with profile() as p:
            sharded(x).logits
            sharded.reshard()
    backend = "gloo" if args.gloo else "MPI"
    print(f"rank {world.rank}: forward unsharded {plain:.3f} s, in a shard group of {world.size} over {backend} "
          f"{fsdp:.3f} s ({fsdp / plain:.2f}x), the same logits bit for bit: {same}", flush=True)
    world.barrier()
    if world.rank == 0:
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=40))
    return 0


if __name__ == "__main__":
    sys.exit(main())
