"""DVC stage `pretrain_generator`: the StyleGAN2 that MFIM uses, as data/generator/generator.pt (our format).

* `generator.checkpoint` set (official .pkl / rosinality .pt / ours), or `pretrain_generator.shipped_checkpoint`
  set: load it (which verifies it), then copy it (our format) or convert it (official formats) to the output. No
  training.
* otherwise: train a small StyleGAN2 (params `generator` for the architecture, `pretrain_generator` for the run) on
  the training shards (data/shards/train-*.tar) for `pretrain_generator.iterations` iterations.

Writes reports/pretrain.json (mode, final losses, img/s, the pixel-statistics Fréchet distance over training, the
output's sha256) and logs to MLflow: the losses every 10 iterations, sample grids of the EMA generator and the
metric every `sample_every` iterations.
"""

from mfim.runtime import ensure_allocator_env

OUT = "data/generator/generator.pt"
SAMPLES_DIR = "data/generator"
SHARDS_DIR = "data/shards"
REPORT = "reports/pretrain.json"
EVAL_IMAGES = 256  # images per side for the pixel-statistics Fréchet distance


def import_checkpoint(source: str, out: str) -> dict:
    """Verify ``source`` by loading it, then place it at ``out`` in our format (byte copy if it already is)."""
    from pathlib import Path

    import torch

    from mfim.assets import resolve, sha256_file
    from mfim.atomic import atomic_copy
    from mfim.weights import (
        ASSET_NAME,
        CheckpointError,
        load_discriminator,
        load_generator,
        read_checkpoint,
        save_checkpoint,
    )

    src = resolve(ASSET_NAME, source, fetch_missing=False)
    raw = read_checkpoint(src)
    G = load_generator(src)
    with torch.no_grad():
        img = G(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(0)))
    if not torch.isfinite(img).all():
        raise CheckpointError(f"{src}: the generator produces non-finite images")
    try:
        D = load_discriminator(src)
    except CheckpointError:
        D = None
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    digest = sha256_file(src)
    if raw.format == "mfim":
        atomic_copy(src, out_path)
    else:
        save_checkpoint(out_path, G, D, extra={"source": str(src), "source_format": raw.format,
                                               "source_sha256": digest})  # fmt: skip
    return {
        "mode": "imported",
        "source": str(src),
        "source_format": raw.format,
        "source_sha256": digest,
        "has_discriminator": D is not None,
        "generator_config": G.config,
        "num_style_layers": len(G.style_layers),
    }


def make_eval_fn(pattern: str, resolution: int, seed: int, device):
    """Fréchet distance between 8x8-pooled pixel statistics of real and EMA-generated images (a cheap trend metric,
    not FID), on a fixed set of reals and fixed latents."""
    import torch

    from mfim.data.shards import image_batches
    from mfim.nets.fid import frechet_distance
    from mfim.training.pretrain import gaussian_stats, pixel_features

    reals = []
    it = image_batches(pattern, resolution, 64, seed + 777)
    while sum(r.shape[0] for r in reals) < EVAL_IMAGES:
        reals.append(next(it))
    real_stats = gaussian_stats(pixel_features(torch.cat(reals)[:EVAL_IMAGES]))

    def eval_fn(G_ema, step: int) -> dict:
        gen = torch.Generator().manual_seed(seed + 999)
        fakes = []
        with torch.no_grad():
            for _ in range(0, EVAL_IMAGES, 32):
                zz = torch.randn(32, G_ema.z_dim, generator=gen).to(device)
                fakes.append(G_ema(zz, noise_mode="const").cpu())
        fake_stats = gaussian_stats(pixel_features(torch.cat(fakes)[:EVAL_IMAGES]))
        return {"fd_pixels8": frechet_distance(real_stats, fake_stats)}

    return eval_fn


def train(params: dict, device) -> dict:
    import mlflow

    from mfim.config import lookup
    from mfim.data.shards import image_batches, split_pattern
    from mfim.models.stylegan2 import discriminator_for, generator_from_params
    from mfim.tracking import start_run
    from mfim.training.pretrain import pretrain

    g, pg = params["generator"], params["pretrain_generator"]
    seed = int(lookup(params, "project.seed"))
    import torch

    torch.manual_seed(seed)
    G = generator_from_params(g)
    D = discriminator_for(G)
    pattern = split_pattern(SHARDS_DIR, "train")
    batches = image_batches(pattern, G.resolution, int(pg["batch_size"]), seed)
    cfg = dict(pg, seed=seed, device=str(device), checkpoint_name="generator.pt")

    def log_fn(step, metrics, artifacts=None):
        if metrics:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
        for a in artifacts or []:
            mlflow.log_artifact(str(a), artifact_path="samples")

    with start_run("pretrain_generator", params, ["generator", "pretrain_generator"]):
        eval_fn = make_eval_fn(pattern, G.resolution, seed, device)
        summary = pretrain(G, D, batches, cfg, SAMPLES_DIR, log_fn=log_fn, eval_fn=eval_fn)
        summary.pop("networks")
        summary.update(mode="trained", generator_config=G.config, num_style_layers=len(G.style_layers))
        mlflow.log_metrics({f"final_{k}": v for k, v in summary["final"].items()})
        mlflow.log_metric("img_per_s", summary["img_per_s"])
    return summary


def main(params_path: str = "params.yaml") -> dict:
    import json
    from pathlib import Path

    from mfim.assets import sha256_file
    from mfim.config import load_params, lookup
    from mfim.runtime import configure_threads, pick_device
    from mfim.training.pretrain import sample_checkpoint

    params = load_params(params_path)
    configure_threads(lookup(params, "project.threads"))
    device = pick_device(str(lookup(params, "project.device")))
    source = lookup(params, "generator.checkpoint") or lookup(params, "pretrain_generator.shipped_checkpoint")
    if source:
        summary = import_checkpoint(str(source), OUT)
        sample_checkpoint(OUT, Path(SAMPLES_DIR) / "samples" / "imported.png", device)
    else:
        summary = train(params, device)
    summary["output"] = OUT
    summary["output_sha256"] = sha256_file(OUT)
    Path(REPORT).parent.mkdir(parents=True, exist_ok=True)
    Path(REPORT).write_text(json.dumps(summary, indent=2) + "\n")
    if summary["mode"] == "imported":
        import mlflow

        from mfim.tracking import start_run

        with start_run("pretrain_generator", params, ["generator", "pretrain_generator"]):
            mlflow.log_artifact(REPORT)
    if summary["mode"] == "trained":
        print(
            f"pretrain_generator: {summary['iterations']} iterations, {summary['img_per_s']:.1f} img/s, "
            f"final loss_G {summary['final'].get('loss_G', float('nan')):.3f} "
            f"loss_D {summary['final'].get('loss_D', float('nan')):.3f} -> {OUT}"
        )
    else:
        print(f"pretrain_generator: imported {summary['source']} ({summary['source_format']}) -> {OUT}")
    return summary


if __name__ == "__main__":
    ensure_allocator_env()
    from mfim.config import exit_on_params_error

    with exit_on_params_error("pretrain_generator"):
        main()
