"""Drive Meta-World robots with the shipped diffusion policy, uncached and with a BAC schedule.

python examples/policy_rollout.py --task drawer-open-v3 --episodes 8

Loads ``models/policy-metaworld``, calibrates a BAC schedule (10 updates per sub-block of 100 DDPM steps) on a
few calibration episodes, saves it as JSON, and runs the same evaluation episodes uncached and with the schedule,
printing success rate, per-chunk latency and the control rate the policy allows. On a GPU add ``--cuda-graph`` to
replay each chunk as one CUDA graph (the static schedule is captured with it).
"""

import argparse

import torch

import diffusers_block
from diffusers_block.pipelines.policy.calibrate import calibrate_policy, calibration_observations
from diffusers_block.pipelines.policy.envs import EnvPool
from diffusers_block.pipelines.policy.rollout import EVAL_SEED, load_policy, make_actor, run_episodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="drawer-open-v3")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=200, help="environment steps before an episode fails")
    parser.add_argument("--schedule", default="policy_bac_schedule.json")
    parser.add_argument("--cuda-graph", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    pipe = load_policy(device=args.device)
    obs, tasks = calibration_observations(pipe, [args.task])
    calibrate_policy(pipe, obs, tasks, updates=args.updates).save(args.schedule)

    config = pipe.transformer.config
    with EnvPool([args.task] * args.episodes, EVAL_SEED) as pool:
        for name in ("uncached", "bac"):
            pipe.disable_block_cache()
            if name == "bac":
                pipe.enable_block_cache(diffusers_block.StaticScheduleConfig.load(args.schedule))
            torch.manual_seed(0)
            act = make_actor(pipe, 100, graph=args.cuda_graph, batch=args.episodes)
            result = run_episodes(act, pool, range(args.episodes), config.n_obs_steps, max_steps=args.max_steps)
            s = result.summary(config.n_action_steps)
            print(
                f"{name:9s} success {s['success_rate']:.0%}, chunk latency p50 {s['latency_ms_p50']:.1f} ms "
                f"(p99 {s['latency_ms_p99']:.1f}), policy allows {s['policy_hz']:.0f} Hz"
            )
    print(pipe.block_cache_summary())


if __name__ == "__main__":
    main()
