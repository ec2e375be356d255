#!/usr/bin/env python3
"""A loopback stand-in for the Hugging Face Hub serving MNIST and Fashion-MNIST, for trying the
Hub data path on a machine without internet (how issue 17's end-to-end check was run).

It builds the dataset viewer's Parquet files of `ylecun/mnist` (mnist/{train,test}/0000.parquet)
and `zalando-datasets/fashion_mnist` (fashion_mnist/test/0000.parquet) from local IDX files with
pyarrow and Pillow, in the `datasets` Image-feature layout ({image: {bytes: PNG, path}, label:
int64}), and answers the Hub's `resolve` requests for them: HEAD with ETag, X-Repo-Commit and
Content-Length (no X-Xet-Hash, so hf-hub downloads over plain HTTP), GET with the bytes.

    pip install pyarrow pillow
    python3 scripts/mock_hub.py --idx ../shared/data --port 8765 &
    HF_ENDPOINT=http://127.0.0.1:8765 cargo run --release -- train --config configs/quickstart.toml
"""
import argparse
import gzip
import hashlib
import http.server
import io
import os
import struct

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def read_idx(path):
    raw = open(path, "rb").read() if os.path.exists(path) else gzip.open(path + ".gz").read()
    magic, n = struct.unpack(">II", raw[:8])
    if magic == 2051:
        h, w = struct.unpack(">II", raw[8:16])
        return [raw[16 + i * h * w : 16 + (i + 1) * h * w] for i in range(n)], (h, w)
    return list(raw[8 : 8 + n]), None


def parquet(folder, prefix):
    images, (h, w) = read_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte"))
    labels, _ = read_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"))
    pngs = []
    for px in images:
        buf = io.BytesIO()
        Image.frombytes("L", (w, h), px).save(buf, format="PNG")
        pngs.append({"bytes": buf.getvalue(), "path": None})
    table = pa.table({"image": pngs, "label": pa.array(labels, pa.int64())})
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idx", required=True, help="folder holding mnist/ and fashion-mnist/ IDX files")
    ap.add_argument("--port", type=int, default=8765)
    a = ap.parse_args()
    files = {
        "mnist/train/0000.parquet": parquet(os.path.join(a.idx, "mnist"), "train"),
        "mnist/test/0000.parquet": parquet(os.path.join(a.idx, "mnist"), "t10k"),
        "fashion_mnist/test/0000.parquet": parquet(os.path.join(a.idx, "fashion-mnist"), "t10k"),
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self, body_too):
            hit = next((b for name, b in files.items() if "/resolve/" in self.path and self.path.endswith("/" + name)), None)
            self.send_response(200 if hit is not None else 404)
            self.send_header("X-Repo-Commit", COMMIT)
            if hit is None:
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_header("ETag", '"%s"' % hashlib.sha256(hit).hexdigest())
            self.send_header("Content-Length", str(len(hit)))
            self.end_headers()
            if body_too:
                self.wfile.write(hit)

        def do_HEAD(self):
            self.answer(False)

        def do_GET(self):
            self.answer(True)

    print(f"mock Hub on http://127.0.0.1:{a.port}: " + ", ".join(f"{k} ({len(v)} B)" for k, v in files.items()), flush=True)
    http.server.ThreadingHTTPServer(("127.0.0.1", a.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
