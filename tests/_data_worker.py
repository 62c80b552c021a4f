"""One process of the two-process input pipeline test (tests/test_data_pipeline.py).

Usage: python _data_worker.py PROCESS_ID PORT DATA_DIR OUT_JSON

Joins a 2-process JAX job on 127.0.0.1:PORT (2 CPU devices each), runs one eval pass and two
train steps over digits, and writes what this process fed: the ids of its rows of every batch.
"""

import json
import sys

import jax
import numpy as np
import tensorflow  # noqa: F401  (before deit_jax: then it need not import torchvision first)

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 2)


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in batch order."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def main() -> None:
    process_id, port, data_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id
    )
    from deit_jax.config import base_config
    from deit_jax.data import build_eval, build_train

    config = base_config()
    config.data.name = "digits"
    config.data.data_dir = data_dir
    config.data.eval_split = "test[:355]"  # 177 + 178 examples: uneven shares, padded batches
    config.data.img_size = 16
    config.data.repeated_aug = 1
    config.augment.randaugment = ""  # this test is about who feeds what; keep tracing short
    config.batch_size = 16
    config.eval_batch_size = 48
    mesh = jax.make_mesh((4,), ("data",))

    evaluation = build_eval(config, mesh, with_ids=True)
    steps, eval_ids, eval_labels = 0, [], []
    for batch in evaluation:
        steps += 1
        assert batch["image"].shape == (48, 16, 16, 3), batch["image"].shape
        mask = local_rows(batch["mask"])
        eval_ids += local_rows(batch["id"])[mask].tolist()
        eval_labels += local_rows(batch["label"])[mask].tolist()

    train = build_train(config, mesh, with_ids=True)
    train_ids = [local_rows(next(train)["id"]).tolist() for _ in range(2)]
    train.close()
    with open(out, "w") as f:
        json.dump(
            {
                "steps": steps,
                "declared_steps": evaluation.steps,
                "eval_ids": eval_ids,
                "eval_labels": eval_labels,
                "train_ids": train_ids,
                "steps_per_epoch": train.steps_per_epoch,
            },
            f,
        )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
