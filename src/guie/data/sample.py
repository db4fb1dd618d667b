"""A small multi-domain, instance-level data set built from photos that ship with packages.

No data can be downloaded here, yet the loaders, training and evaluation need real pixels in
both on-disk formats. Each source photo (scikit-image's and matplotlib's sample images) is
assigned a GUIE-like domain; an *instance* is a distinct region of a photo (textured, little
overlap with the photo's other instances), and its *views* are photometric and geometric
variations of that region (jittered box, scale, flip, brightness/contrast/colour, blur, JPEG
quality 70-95), saved at varied sizes: mostly `image_size_range` on the long side, some 1:3 or
3:1 strips and a few tiny images, as the Kaggle host may feed. Retrieving the other views of
an instance is then a meaningful (if easy) instance-retrieval task.

About half the domains are written as TFRecord shards (labels 0..N1-1), the rest as an image
folder with a CSV (labels 0..N2-1, label_offset N1), so the merged label space is 0..N1+N2-1.
The returned DataSources' locations are RELATIVE to `out_dir`: pass `out_dir` as the root.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter
from tqdm.auto import tqdm

from guie.config import DataSource
from guie.data.tfrecord import encode_example, write_tfrecord
from guie.errors import UserValueError

FORMAT = "guie-sample-v2"  # v2: more photos, label ranges per photo in the manifest
NUM_SHARDS = 4
TFRECORD_DIR = "tfrecord"
CSV_FILE = "csv/labels.csv"
_MAX_PHOTO_SIDE = 512  # photos are shrunk first: views are at most a few hundred px anyway
_MIN_BOX_SIDE = 24
_MIN_TEXTURE_STD = 10.0  # grey-level std; flat regions (sky, black space) are not instances
_MAX_OVERLAP = 0.25  # intersection / smaller box area between instances of one photo
_BOX_TRIES = 60

# (domain, package, file). The motorcycle's right stereo image is left out because its regions
# would duplicate the left one's under other labels. The grey-level photos (brick, camera, ...)
# are real photos too: more source photos let whole photos be held out (`photo_split`) and
# still leave varied ones to train on.
PHOTOS = (
    ("apparel", "skimage", "astronaut.png"),
    ("apparel", "matplotlib", "grace_hopper.jpg"),
    ("apparel", "skimage", "camera.png"),
    ("dishes", "skimage", "coffee.png"),
    ("cars", "skimage", "motorcycle_left.png"),
    ("landmarks", "skimage", "rocket.jpg"),
    ("landmarks", "skimage", "moon.png"),
    ("artwork", "skimage", "hubble_deep_field.jpg"),
    ("artwork", "skimage", "retina.jpg"),
    ("illustrations", "skimage", "color.png"),
    ("illustrations", "skimage", "ihc.png"),
    ("illustrations", "skimage", "logo.png"),
    ("memes", "skimage", "chelsea.png"),
    ("memes", "skimage", "text.png"),
    ("memes", "skimage", "page.png"),
    ("packaged_goods", "matplotlib", "Minduka_Present_Blue_Pack.png"),
    ("packaged_goods", "skimage", "coins.png"),
    ("furniture", "skimage", "brick.png"),
    ("furniture", "skimage", "gravel.png"),
    ("furniture", "skimage", "grass.png"),
)


_GREY_OR_LOGO = {"camera.png", "moon.png", "logo.png", "text.png", "page.png", "coins.png",
                 "brick.png", "gravel.png", "grass.png"}


def _photo_path(package: str, name: str) -> Path:
    if package == "skimage":
        import skimage.data
        return Path(skimage.data.data_dir) / name
    import matplotlib
    return Path(matplotlib.get_data_path()) / "sample_data" / name


def _load_photo(path: Path) -> Image.Image:
    img = Image.open(path)
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(canvas, img)  # transparent background -> white
    img = img.convert("RGB")
    scale = _MAX_PHOTO_SIDE / min(img.size)
    if scale < 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
    return img


def _available_photos() -> list[tuple[str, str, Image.Image]]:
    photos = [(d, n, _load_photo(p)) for d, pkg, n in PHOTOS
              if (p := _photo_path(pkg, n)).is_file()]
    if len({d for d, n, _ in photos if n not in _GREY_OR_LOGO}) < 6:
        raise RuntimeError(f"only {len(photos)} sample photos found; need 6 domains "
                           "(are scikit-image and matplotlib installed?)")
    return photos


def _allocate(weights: np.ndarray, total: int) -> np.ndarray:
    """One instance per photo, the rest by weight (largest remainder)."""
    if total < len(weights):
        raise UserValueError(f"num_instances must be >= {len(weights)} (one per photo)")
    share = (total - len(weights)) * weights / weights.sum()
    counts = np.floor(share).astype(int)
    counts[np.argsort(-(share - counts), kind="stable")[: total - len(weights) - counts.sum()]] += 1
    return counts + 1


class _Texture:
    """O(1) grey-level std of any box, from integral images."""

    def __init__(self, img: Image.Image):
        g = np.asarray(img.convert("L"), np.float64)
        self.s = np.pad(g.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        self.s2 = np.pad((g * g).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def std(self, x0: int, y0: int, x1: int, y1: int) -> float:
        def total(s):
            return s[y1, x1] - s[y0, x1] - s[y1, x0] + s[y0, x0]
        n = (x1 - x0) * (y1 - y0)
        mean = total(self.s) / n
        return float(np.sqrt(max(total(self.s2) / n - mean * mean, 0.0)))


def _overlap(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller


def _sample_boxes(img: Image.Image, n: int, rng: np.random.Generator) -> list[tuple]:
    """n textured, mostly non-overlapping boxes (x0, y0, x1, y1) in one photo."""
    w, h = img.size
    tex = _Texture(img)
    target = np.sqrt(w * h * 0.5 / n)  # boxes together cover about half the photo
    lo, hi = _MIN_BOX_SIDE, 0.6 * min(w, h)
    boxes: list[tuple] = []
    for _ in range(n):
        best, best_cost = None, np.inf
        for _ in range(_BOX_TRIES):
            side = float(np.clip(target * rng.uniform(0.75, 1.35), lo, hi))
            aspect = np.exp(rng.uniform(-0.4, 0.4))
            bw = int(min(w, max(_MIN_BOX_SIDE, side * np.sqrt(aspect))))
            bh = int(min(h, max(_MIN_BOX_SIDE, side / np.sqrt(aspect))))
            x0 = int(rng.integers(0, w - bw + 1))
            y0 = int(rng.integers(0, h - bh + 1))
            box = (x0, y0, x0 + bw, y0 + bh)
            overlap = max((_overlap(box, b) for b in boxes), default=0.0)
            flat = tex.std(*box) < _MIN_TEXTURE_STD
            if overlap < _MAX_OVERLAP and not flat:
                best = box
                break
            cost = overlap + (1.0 if flat else 0.0)  # fallback: the least bad candidate
            if cost < best_cost:
                best, best_cost = box, cost
        boxes.append(best)
    return boxes


def _clamp_box(cx, cy, bw, bh, w, h) -> tuple[float, float, float, float]:
    bw, bh = min(bw, w), min(bh, h)
    x0 = float(np.clip(cx - bw / 2, 0, w - bw))
    y0 = float(np.clip(cy - bh / 2, 0, h - bh))
    return x0, y0, x0 + bw, y0 + bh


def _render_view(img: Image.Image, box, kind: str, rng: np.random.Generator,
                 size_range: tuple[int, int]) -> bytes:
    w, h = img.size
    bw, bh = box[2] - box[0], box[3] - box[1]
    scale = rng.uniform(0.9, 1.12)
    cx = (box[0] + box[2]) / 2 + rng.uniform(-0.06, 0.06) * bw
    cy = (box[1] + box[3]) / 2 + rng.uniform(-0.06, 0.06) * bh
    bw, bh = bw * scale, bh * scale
    if kind == "strip":  # widen (or heighten) the shot to 3:1 around the instance
        short = int(rng.integers(24, 57))
        if rng.random() < 0.5:
            long_box = min(3 * bh, w)
            bw, bh, out = long_box, long_box / 3, (3 * short, short)
        else:
            long_box = min(3 * bw, h)
            bw, bh, out = long_box / 3, long_box, (short, 3 * short)
    else:
        lo, hi = (16, 32) if kind == "tiny" else size_range
        long_side = int(rng.integers(lo, hi + 1))
        aspect = bw / bh * np.exp(rng.uniform(-0.15, 0.15))  # mild squash, as resizers do
        out = ((long_side, max(8, round(long_side / aspect))) if aspect >= 1
               else (max(8, round(long_side * aspect)), long_side))
    crop_box = _clamp_box(cx, cy, bw, bh, w, h)
    view = img.resize(out, Image.BILINEAR, box=crop_box, reducing_gap=2.0)
    view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.75, 1.25))
    view = ImageEnhance.Contrast(view).enhance(rng.uniform(0.75, 1.25))
    view = ImageEnhance.Color(view).enhance(rng.uniform(0.7, 1.3))
    if rng.random() < 0.25:
        view = view.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0)))
    if rng.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    view.save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
    return buf.getvalue()


def _sources(n_tfrecord_labels: int) -> tuple[DataSource, DataSource]:
    return (
        DataSource(name="sample_tfrecord", kind="tfrecord", location=TFRECORD_DIR,
                   pattern="*-train-*.tfrec"),
        DataSource(name="sample_csv", kind="csv", location=CSV_FILE,
                   label_offset=n_tfrecord_labels),
    )


def _complete_build(out_dir: Path, params: dict) -> dict | None:
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT or manifest.get("params") != params:
        return None
    files = [out_dir / f for f in manifest.get("files", [])]
    return manifest if files and all(f.is_file() for f in files) else None


def build_sample_data(out_dir: str | Path, num_instances: int = 400, views_per_instance: int = 6,
                      seed: int = 0, image_size_range: tuple[int, int] = (64, 160),
                      ) -> tuple[DataSource, DataSource]:
    """Build (or reuse) the sample set in `out_dir`; returns (tfrecord source, csv source)
    with locations relative to `out_dir`. Deterministic for its arguments. A rebuild replaces
    only what this function writes: tfrecord/, csv/, manifest.json and README.txt."""
    out_dir = Path(out_dir).absolute()
    params = {"num_instances": num_instances, "views_per_instance": views_per_instance,
              "seed": seed, "image_size_range": list(image_size_range)}
    manifest = _complete_build(out_dir, params)
    if manifest is not None:
        return _sources(manifest["tfrecord_labels"])

    (out_dir / "manifest.json").unlink(missing_ok=True)
    for sub in (TFRECORD_DIR, Path(CSV_FILE).parent):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    (out_dir / TFRECORD_DIR).mkdir(parents=True)
    (out_dir / CSV_FILE).parent.mkdir(parents=True)

    photos = _available_photos()
    if num_instances < len(photos):
        # Fewer instances than photos (test builds): one instance each of the first photos,
        # the colour ones of the v1 set first.
        keep = sorted(range(len(photos)),
                      key=lambda i: (photos[i][1] in _GREY_OR_LOGO, i))[:max(num_instances, 1)]
        photos = [photos[i] for i in sorted(keep)]
    domains = sorted({d for d, _, _ in photos})
    tf_domains = set(domains[0::2])  # alternate, so both formats get several domains
    counts = _allocate(np.array([min(p.width * p.height, 300_000) for _, _, p in photos],
                                np.float64), num_instances)
    # TFRecord photos first, so their instances take labels 0..N1-1.
    order = sorted(range(len(photos)), key=lambda i: (photos[i][0] not in tf_domains, i))
    next_label = {True: 0, False: 0}
    tf_records: list[bytes] = []
    csv_rows: list[str] = ["path,label,domain"]
    files: list[str] = []
    stats: dict[str, dict] = {}
    photo_labels: list[dict] = []
    # Printed as well as the bar: a notebook log or a CI job (no TTY: no bar) still shows it.
    print(f"sample data: building {int(counts.sum())} instances x {views_per_instance} views "
          f"from {len(photos)} photos in {out_dir}", flush=True)
    bar = tqdm(total=int(counts.sum()), desc="sample data", unit="instance", disable=None)
    for pi in order:
        domain, name, img = photos[pi]
        in_tf = domain in tf_domains
        boxes = _sample_boxes(img, int(counts[pi]), np.random.default_rng([seed, 0, pi]))
        photo_labels.append({"photo": name, "domain": domain, "tfrecord": in_tf,
                             "first_label": next_label[in_tf], "instances": len(boxes)})
        for box in boxes:
            label = next_label[in_tf]
            next_label[in_tf] += 1
            rng = np.random.default_rng([seed, 1, pi, label])
            kinds = ["normal"] * views_per_instance
            special = int(rng.integers(1, views_per_instance)) if views_per_instance > 1 else 0
            if label % 8 == 3:
                kinds[special] = "strip"
            elif label % 16 == 5:
                kinds[special] = "tiny"
            for v, kind in enumerate(kinds):
                jpeg = _render_view(img, box, kind, rng, image_size_range)
                if in_tf:
                    tf_records.append(encode_example(jpeg, label, domain))
                else:
                    rel = f"images/{domain}/{label:05d}_{v}.jpg"
                    (out_dir / "csv" / rel).parent.mkdir(parents=True, exist_ok=True)
                    (out_dir / "csv" / rel).write_bytes(jpeg)
                    csv_rows.append(f"{rel},{label},{domain}")
            s = stats.setdefault(domain, {"format": "tfrecord" if in_tf else "csv",
                                          "photos": [], "instances": 0})
            s["photos"] = sorted(set(s["photos"]) | {name})
            s["instances"] += 1
            bar.update(1)
    bar.close()

    perm = np.random.default_rng([seed, 2]).permutation(len(tf_records))
    for k, part in enumerate(np.array_split(perm, NUM_SHARDS)):
        shard = f"{TFRECORD_DIR}/sample-train-{k:02d}.tfrec"
        write_tfrecord(out_dir / shard, (tf_records[i] for i in part))
        files.append(shard)
    (out_dir / CSV_FILE).write_text("\n".join(csv_rows) + "\n")
    files.append(CSV_FILE)

    n1, n2 = next_label[True], next_label[False]
    sources = _sources(n1)
    (out_dir / "README.txt").write_text(_readme(n1, n2, views_per_instance, stats, sources))
    photos_out = [{"photo": p["photo"], "domain": p["domain"],
                   # merged label space: the CSV source's labels follow the TFRecords'
                   "labels": [p["first_label"] + (0 if p["tfrecord"] else n1),
                              p["first_label"] + (0 if p["tfrecord"] else n1) + p["instances"]]}
                  for p in photo_labels]
    manifest = {"format": FORMAT, "params": params, "tfrecord_labels": n1, "csv_labels": n2,
                "domains": stats, "photos": photos_out,
                "sources": [asdict(s) for s in sources], "files": files}
    tmp = out_dir / f"manifest.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / "manifest.json")  # written last: its presence marks a full build
    print(f"sample data: {len(tf_records)} TFRecord + {len(csv_rows) - 1} CSV images, "
          f"{n1 + n2} instances", flush=True)
    return sources


def _readme(n1: int, n2: int, views: int, stats: dict, sources) -> str:
    lines = [
        "GUIE kit sample data (built by guie.data.sample.build_sample_data; safe to delete).",
        "",
        "Instance-level retrieval data made from the sample photos that ship with scikit-image",
        "and matplotlib. Each instance is a distinct region of a photo; its "
        f"{views} views are crops",
        "of that region with jitter, scale, flips, colour changes, blur and JPEG quality 70-95,",
        "at varied sizes (some 1:3 / 3:1 strips, a few tiny images).",
        "",
        f"tfrecord/sample-train-XX.tfrec  tf.train.Example records, labels 0..{n1 - 1}",
        "                                (image/encoded, image/class/label, image/domain)",
        f"csv/labels.csv + csv/images/    path,label,domain; labels 0..{n2 - 1}, "
        f"label_offset {n1}",
        f"Merged label space: 0..{n1 + n2 - 1}. Source locations are relative to this folder.",
        "",
        "Domains:",
    ]
    for d, s in sorted(stats.items()):
        lines.append(f"  {d:15s} {s['format']:9s} {s['instances']:4d} instances  "
                     f"from {', '.join(s['photos'])}")
    lines += ["", "DataSources:"] + [f"  {s}" for s in sources]
    return "\n".join(lines) + "\n"
