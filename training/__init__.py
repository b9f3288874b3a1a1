"""Training stage: corpus preparation (`ctxmem data prepare`) and DeepSpeed training (`ctxmem train`).

Layout
    errors.py       typed errors the CLI prints without a traceback
    corpora.py      embedded corpora (chatterbot-corpus, Python's standard library) and file readers
    data.py         tokenised, memory-mapped shards; deterministic batches for any world size
    config.py       the typed training config: pydantic models, YAML + dotted overrides
    zero.py         the DeepSpeed config, built from the training config (the model never sees it)
    checkpoints.py  DeepSpeed checkpoints with a verified manifest; consolidation to a ctxmem checkpoint
    tracking.py     rank-0 MLflow logging that never stops training (journal + sync)
    trainer.py      the training function every launcher runs (one process, local ranks, torchrun, DeepSpeed, Ray)
    launch.py       --nproc (torchrun), --hostfile (DeepSpeed launcher) and --ray (Ray Train)
    worker.py       `python -m ctxmem.training.worker`: the per-process entry point of the launchers
    cli.py          `ctxmem data prepare` and `ctxmem train`

Only the standard library is imported here; torch, deepspeed, mlflow and ray load when a command runs.
"""
