#!/usr/bin/env bash
# Real Fashion-MNIST images ship in Debian's dataset-fashion-mnist package (no download at run time).
set -euo pipefail
DIR="${MABN_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
if [ -f "$DIR/train-images-idx3-ubyte.gz" ] && [ -f "$DIR/t10k-images-idx3-ubyte.gz" ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
echo "[data] installing Debian package dataset-fashion-mnist"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
