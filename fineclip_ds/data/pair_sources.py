"""Image-text pairs to annotate, cut into units of work: one unit becomes one output shard.

Sources: webdataset shards (one unit per input shard), an image folder with a captions file (JSON
{file: caption} or TSV "file<TAB>caption"), or a COCO captions JSON; the last two are cut into
units of `samples_per_shard` images in sorted order, so unit i is the same on every rerun.
"""
from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image

from fineclip_ds.data.coco import read_coco
from fineclip_ds.data.images import open_image
from fineclip_ds.data.records import IMAGE_EXTENSIONS, decode_caption, image_key


@dataclass
class Pair:
    key: str
    image: Image.Image | None  # None: unreadable
    caption: str | None  # None: missing


Unit = Callable[[Counter], Iterator[Pair]]  # reading a unit counts unreadable shard data in the Counter


def _file_units(entries: list[tuple[Path, str, str | None]], samples_per_shard: int) -> list[Unit]:
    """entries: (image path, key, caption or None)."""
    def unit(chunk: list[tuple[Path, str, str | None]]) -> Unit:
        def read(counts: Counter) -> Iterator[Pair]:
            for path, key, caption in chunk:
                yield Pair(key, open_image(lambda: Image.open(path)), caption)
        return read

    return [unit(entries[start:start + samples_per_shard]) for start in range(0, len(entries), samples_per_shard)]


def _caption(value: Any) -> str | None:
    """A caption from a captions file, stripped; None (counted as missing) when it is not text or blank,
    as webdataset captions are read, so every source writes only captions the training loader accepts."""
    return decode_caption(value) if isinstance(value, str) else None


def folder_units(image_dir: Path, captions_file: Path, samples_per_shard: int) -> list[Unit]:
    # utf-8-sig: a byte-order mark (Excel, Notepad) is dropped, not read into the first row's file name
    text = Path(captions_file).read_text(encoding="utf-8-sig")
    if Path(captions_file).suffix == ".json":
        captions = json.loads(text)
        if not isinstance(captions, dict):
            raise ValueError(f"{captions_file}: expected a JSON object {{file: caption}}, got {type(captions).__name__}")
    else:
        captions = dict(line.split("\t", 1) for line in text.splitlines() if "\t" in line)
    files = {p.name: p for p in Path(image_dir).iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS}
    # a caption row naming no image in the folder is kept as an entry that fails to open (counted as
    # corrupt_image, as a COCO captions source counts a missing file), not dropped without a word
    for name in captions.keys() - files.keys():
        files[name] = Path(image_dir) / name
    return _file_units([(files[name], name, _caption(captions.get(name))) for name in sorted(files)],
                       samples_per_shard)


def coco_caption_units(captions_json: Path, image_dir: Path, samples_per_shard: int) -> list[Unit]:
    """Key: the image's file_name as the JSON gives it (FineCLIP's region-caption keys start with it)."""
    names, annotations = read_coco(captions_json)
    first_caption: dict[Any, str] = {}
    for annotation in annotations:
        caption = _caption(annotation.get("caption"))
        if caption:
            first_caption.setdefault(annotation["image_id"], caption)
    images = sorted(names.items(), key=lambda image: image[1])
    return _file_units([(Path(image_dir) / file_name, file_name, first_caption.get(image_id))
                        for image_id, file_name in images], samples_per_shard)


def webdataset_units(urls: str) -> list[Unit]:
    from fineclip_ds.data.streams import expand_shard_urls, read_raw_records

    def unit(url: str) -> Unit:
        def read(counts: Counter) -> Iterator[Pair]:
            for record in read_raw_records([url], counts):
                extension = image_key(record)
                image = open_image(lambda: Image.open(io.BytesIO(record[extension]))) if extension else None
                caption = decode_caption(record["txt"]) if "txt" in record else None
                yield Pair(record["__key__"], image, caption)
        return read

    return [unit(url) for url in expand_shard_urls(urls)]
