#!/usr/bin/env bash
# Build the repo's two images (Dockerfile targets `operator` and `trainer`) and the Kubernetes
# pause image without a container registry, cache them, and load them into a containerd.
#
#   bash hack/images.sh [all]                      # build (cached) and print the image refs
#   bash hack/images.sh build                      # same
#   bash hack/images.sh dockerd                    # only start dockerd if it is not running
#   bash hack/images.sh load --address SOCK        # import the three images into SOCK's k8s.io namespace
#
# Base images are not pulled: a `debootstrap --variant=minbase bookworm` rootfs (python3,
# python3-venv, ca-certificates from deb.debian.org) is imported into Docker and stands in for
#   python:3.11-slim-bookworm  -> kubetune.local/base-python:bookworm-<key>  (a venv at /usr/local)
#   nvidia/cuda:...-runtime    -> kubetune.local/base-cuda:bookworm-<key>    (apt works; CUDA comes
#                                 from torch's nvidia-* wheels, the driver from the node)
# and the Dockerfile is built with --build-arg PYTHON_IMAGE/CUDA_IMAGE pointing at them. pip in
# the build reaches PyPI directly (--network host). The pause image is pause.c from the
# Kubernetes source (Go module cache), compiled static.
#
# Cache, under ${KUBETUNE_CACHE:-~/.cache/kubetune}/images:
#   rootfs-bookworm-<key>.tar   the debootstrap rootfs, <key> = sha256(suite, mirror, packages, recipe)
#   images.env                  OPERATOR_IMAGE, TRAINER_IMAGE, PAUSE_IMAGE of the last build
# Image tags carry content keys: kubetune.local/{operator,trainer}:<key> with <key> = sha256 of the
# Dockerfile, .dockerignore, pyproject.toml, constraints.txt, README.md, hack/install.sh, every
# file copied from kubetune/ operator/ trainer/, and the base key. An image whose tag exists is
# not rebuilt, so a warm run with nothing changed takes seconds.
#
# dockerd is Debian's docker.io (always /usr/bin/docker: /usr/local/bin/docker may be another
# client). It is started with --iptables=false --bridge=none so it leaves the host's (and the
# local cluster's) networking alone; builds therefore use --network host.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}
IMAGES=$CACHE/images
RUNDIR=$CACHE/run
DOCKER=/usr/bin/docker
DOCKERD=/usr/sbin/dockerd
REG=kubetune.local
SUITE=bookworm
MIRROR=${KUBETUNE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv,ca-certificates
ROOTFS_RECIPE=1           # bump when the rootfs or base-image recipe below changes
# Certificate authorities this machine added to its trust store (Debian: update-ca-certificates),
# e.g. a TLS-intercepting egress proxy's: the stand-in bases trust them too, so pip in the build
# reaches PyPI the way the host does. None on a machine without local CAs.
CA_DIR=${KUBETUNE_EXTRA_CA_DIR:-/usr/local/share/ca-certificates}
K8S_VERSION=v1.34.4
PAUSE_TAG=3.10
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-1}

say() { echo "images: $*" >&2; }
die() { echo "images: error: $*" >&2; exit 1; }
sha() { sha256sum | cut -c1-12; }
# timed NAME CMD...: run CMD, print how long it took
timed() {
  local name=$1 t0=$SECONDS rc=0; shift
  "$@" || rc=$?
  if ((rc == 0)); then say "$name: $((SECONDS - t0))s"; else say "$name: failed after $((SECONDS - t0))s"; fi
  return "$rc"
}
need() {  # need BINARY APT-PACKAGE
  [[ -x "$1" ]] || command -v "$1" >/dev/null 2>&1 || die "$1 not found: apt-get install -y $2"
}
image_exists() { $DOCKER image inspect "$1" >/dev/null 2>&1; }
# One build at a time, and no build (it untags superseded images) while a load reads them.
lock() {  # lock -x|-s
  mkdir -p "$IMAGES"
  exec 9>"$IMAGES/.lock"
  flock -n "$1" 9 || { say "waiting for another hack/images.sh (lock $IMAGES/.lock)"; flock "$1" 9; }
}

# ---------------------------------------------------------------------------------------- dockerd
start_dockerd() {
  need "$DOCKER" docker.io
  if $DOCKER info >/dev/null 2>&1; then return 0; fi
  need "$DOCKERD" docker.io
  need containerd containerd
  need runc runc
  [[ $(id -u) == 0 ]] || die "dockerd is not running and starting it needs root"
  mkdir -p "$RUNDIR"
  local log=$RUNDIR/dockerd.log
  say "starting dockerd (log: $log)"
  # setsid + nohup: dockerd outlives this script (it is a cache, like the images it holds).
  setsid nohup "$DOCKERD" --iptables=false --bridge=none >>"$log" 2>&1 </dev/null &
  local pid=$! deadline=$((SECONDS + 60))
  echo "$pid" >"$RUNDIR/dockerd.pid"
  until $DOCKER info >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$log" >&2; die "dockerd exited during start-up (log above, full log: $log)"
    fi
    if ((SECONDS > deadline)); then
      tail -n 30 "$log" >&2; die "dockerd not ready after 60s (log above, full log: $log)"
    fi
    sleep 0.5
  done
  say "dockerd ready (pid $pid)"
}

# ---------------------------------------------------------------------------------- base images
rootfs_key() { echo "$SUITE $MIRROR $PACKAGES $ROOTFS_RECIPE" | sha; }
extra_cas() { [[ -d $CA_DIR ]] && find "$CA_DIR" -type f -name '*.crt' | LC_ALL=C sort; true; }
base_key() { { rootfs_key; extra_cas | while read -r f; do sha256sum <"$f"; done; } | sha; }

make_rootfs() {  # make_rootfs TARBALL
  local tarball=$1 dir
  need debootstrap debootstrap
  [[ $(id -u) == 0 ]] || die "debootstrap needs root"
  mkdir -p "$IMAGES"
  dir=$(mktemp -d "$IMAGES/rootfs.XXXXXX")
  # debootstrap mounts proc/sys in the target; never leave them mounted (nor the half-built tree).
  # shellcheck disable=SC2064
  trap "umount -R '$dir/proc' '$dir/sys' 2>/dev/null || true; rm -rf --one-file-system '$dir'" EXIT
  say "debootstrap --variant=minbase --include=$PACKAGES $SUITE ($MIRROR)"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$dir" "$MIRROR" \
    >"$IMAGES/debootstrap.log" 2>&1 || { tail -n 30 "$IMAGES/debootstrap.log" >&2; die "debootstrap failed (log: $IMAGES/debootstrap.log)"; }
  # What the official Debian images do: the three suites, no apt lists or .debs left, and
  # no recommends (the trainer stage installs with --no-install-recommends anyway).
  cat >"$dir/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${MIRROR%/debian}/debian-security $SUITE-security main
EOF
  echo 'APT::Install-Recommends "false";' >"$dir/etc/apt/apt.conf.d/01norecommends"
  rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
    "$dir"/var/log/* "$dir"/tmp/* "$dir"/root/.cache
  : >"$dir/etc/hostname"; : >"$dir/etc/resolv.conf"
  umount -R "$dir/proc" "$dir/sys" 2>/dev/null || true
  tar -C "$dir" --numeric-owner --one-file-system -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  rm -rf --one-file-system "$dir"
  trap - EXIT
}

build_bases() {  # sets BASE_PYTHON, BASE_CUDA, BASE_KEY
  local rkey; rkey=$(rootfs_key)
  BASE_KEY=$(base_key)
  local tarball=$IMAGES/rootfs-$SUITE-$rkey.tar rootfs=$REG/base-rootfs:$SUITE-$BASE_KEY
  BASE_PYTHON=$REG/base-python:$SUITE-$BASE_KEY
  BASE_CUDA=$REG/base-cuda:$SUITE-$BASE_KEY
  if image_exists "$BASE_PYTHON" && image_exists "$BASE_CUDA"; then return 0; fi
  [[ -f $tarball ]] || timed "debootstrap rootfs ($(basename "$tarball"))" make_rootfs "$tarball"
  if ! image_exists "$rootfs"; then
    local ctx f i=0 raw=$REG/base-rootfs:$SUITE-$rkey-debootstrap
    timed "docker import $(basename "$tarball")" $DOCKER import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' \
      --message "debootstrap --variant=minbase --include=$PACKAGES $SUITE" "$tarball" "$raw" >/dev/null
    ctx=$(mktemp -d)
    mkdir "$ctx/ca"
    while read -r f; do cp "$f" "$ctx/ca/local-$((i++)).crt"; done < <(extra_cas)
    printf '%s\n' "FROM $raw" "COPY ca/ /usr/local/share/ca-certificates/" \
      "RUN update-ca-certificates >/dev/null" >"$ctx/Dockerfile"
    timed "image $rootfs (+$i local CAs)" $DOCKER build -q --network none -t "$rootfs" "$ctx" >/dev/null
    rm -rf "$ctx"
    $DOCKER rmi "$raw" >/dev/null
  fi
  # Stand-in for nvidia/cuda:*-runtime: its environment (the NVIDIA container runtime exposes the
  # node's driver from NVIDIA_VISIBLE_DEVICES; the CUDA libraries come from torch's wheels).
  timed "image $BASE_CUDA" $DOCKER build -q --network none -t "$BASE_CUDA" - >/dev/null <<EOF
FROM $rootfs
ENV PATH=/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
LABEL io.kubetune.stands-in-for="nvidia/cuda runtime" io.kubetune.key="$BASE_KEY"
EOF
  # Stand-in for python:3.11-slim-bookworm: python, python3 and pip in /usr/local/bin, and pip
  # may install (Debian's python is PEP 668 externally managed; a venv is not).
  timed "image $BASE_PYTHON" $DOCKER build -q --network none -t "$BASE_PYTHON" - >/dev/null <<EOF
FROM $rootfs
RUN python3 -m venv /usr/local && /usr/local/bin/python -m pip --version
ENV PYTHON_VERSION=3.11
LABEL io.kubetune.stands-in-for="python:3.11-slim-bookworm" io.kubetune.key="$BASE_KEY"
CMD ["python3"]
EOF
}

# ----------------------------------------------------------------------------------------- pause
pause_source() {
  local mod=$CACHE/go/mod src
  src=$mod/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux/pause.c
  if [[ ! -f $src ]]; then
    local go
    go=$(command -v go || echo /usr/local/go/bin/go)
    [[ -x $go ]] || die "$src is missing and go is not installed to fetch it (https://go.dev/dl)"
    say "fetching k8s.io/kubernetes@$K8S_VERSION into $mod (for build/pause)"
    (cd /tmp && GOMODCACHE=$mod GOFLAGS=-mod=mod GOPROXY=https://proxy.golang.org \
      "$go" mod download -json "k8s.io/kubernetes@$K8S_VERSION" >/dev/null)
  fi
  [[ -f $src ]] || die "$src not found after go mod download"
  echo "$src"
}

build_pause() {  # sets PAUSE_IMAGE
  PAUSE_IMAGE=$REG/pause:$PAUSE_TAG
  local src key version dir
  src=$(pause_source)
  need gcc gcc
  [[ -f /usr/lib/x86_64-linux-gnu/libc.a || -f /usr/lib/libc.a ]] || die "static libc missing: apt-get install -y libc6-dev"
  # pause.c prints VERSION for -v; the Makefile next to it says which release this source is.
  version=v$(sed -nE 's/^TAG \?= *//p' "$(dirname "$src")/../Makefile")-kubetune
  key=$( { cat "$src"; gcc --version | head -1; echo "$version"; } | sha)
  if [[ $($DOCKER image inspect -f '{{index .Config.Labels "io.kubetune.key"}}' "$PAUSE_IMAGE" 2>/dev/null) == "$key" ]]; then
    return 0
  fi
  dir=$(mktemp -d)
  gcc -static -O2 -Wall -Werror -DVERSION="$version" -o "$dir/pause" "$src"
  strip "$dir/pause"
  "$dir/pause" -v >/dev/null
  tar -C "$dir" --owner=0 --group=0 -cf - pause | timed "image $PAUSE_IMAGE" $DOCKER import \
    --change 'ENTRYPOINT ["/pause"]' --change 'USER 65535:65535' \
    --change "LABEL io.kubetune.key=$key io.kubetune.source=k8s.io/kubernetes@$K8S_VERSION/build/pause" \
    --message "pause.c $version" - "$PAUSE_IMAGE" >/dev/null
  rm -rf "$dir"
}

# ------------------------------------------------------------------------------ operator, trainer
content_key() {
  # What `COPY` sends (.dockerignore: the three source trees without caches), plus the build
  # recipe and the base images' key.
  (
    cd "$ROOT"
    printf '%s\n' "base $BASE_KEY"
    sha256sum Dockerfile .dockerignore pyproject.toml constraints.txt README.md hack/install.sh
    find kubetune operator trainer -type f ! -path '*/__pycache__/*' ! -name '*.pyc' \
      ! -path '*.egg-info/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  ) | sha
}

build_app() {  # build_app TARGET REF
  local target=$1 ref=$2
  if image_exists "$ref"; then say "$ref: cached"; return 0; fi
  say "docker build --target $target -> $ref (log: $IMAGES/build-$target.log)"
  timed "image $ref" docker_build "$target" "$ref"
}
docker_build() {
  local target=$1 ref=$2 log=$IMAGES/build-$1.log
  $DOCKER build --network host --progress plain \
    --build-arg "PYTHON_IMAGE=$BASE_PYTHON" --build-arg "CUDA_IMAGE=$BASE_CUDA" \
    --label "io.kubetune.key=${ref##*:}" --target "$target" -t "$ref" "$ROOT" >"$log" 2>&1 \
    || { tail -n 40 "$log" >&2; die "docker build --target $target failed (log: $log)"; }
}

drop_old_tags() {  # drop_old_tags REPO KEEP-REF: untag older builds (shared layers stay)
  local repo=$1 keep=$2 old
  for old in $($DOCKER images "$repo" --format '{{.Repository}}:{{.Tag}}'); do
    [[ $old == "$keep" || $old == *:'<none>' ]] || $DOCKER rmi "$old" >/dev/null 2>&1 || true
  done
}

build() {
  local t0=$SECONDS key
  timed "dockerd" start_dockerd
  lock -x
  timed "base images" build_bases
  timed "pause image" build_pause
  key=$(content_key)
  OPERATOR_IMAGE=$REG/operator:$key
  TRAINER_IMAGE=$REG/trainer:$key
  build_app operator "$OPERATOR_IMAGE"
  build_app trainer "$TRAINER_IMAGE"
  drop_old_tags $REG/operator "$OPERATOR_IMAGE"
  drop_old_tags $REG/trainer "$TRAINER_IMAGE"
  drop_old_tags $REG/base-python "$BASE_PYTHON"
  drop_old_tags $REG/base-cuda "$BASE_CUDA"
  drop_old_tags $REG/base-rootfs "$REG/base-rootfs:$SUITE-$BASE_KEY"
  printf 'OPERATOR_IMAGE=%s\nTRAINER_IMAGE=%s\nPAUSE_IMAGE=%s\n' \
    "$OPERATOR_IMAGE" "$TRAINER_IMAGE" "$PAUSE_IMAGE" >"$IMAGES/images.env.tmp"
  mv "$IMAGES/images.env.tmp" "$IMAGES/images.env"
  say "build: $((SECONDS - t0))s (refs in $IMAGES/images.env)"
  cat "$IMAGES/images.env"
}

# ------------------------------------------------------------------------------------------ load
# Config digest of REF in the containerd at SOCK (namespace k8s.io), empty if absent. Docker's
# image ID is the digest of the same config, so equal digests mean the same image content.
ctr_config_digest() {
  local sock=$1 ref=$2 manifest
  manifest=$(ctr --address "$sock" -n k8s.io images ls "name==$ref" 2>/dev/null | awk 'NR==2 {print $3}')
  [[ -n $manifest ]] || return 0
  ctr --address "$sock" -n k8s.io content get "$manifest" 2>/dev/null \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["config"]["digest"])' 2>/dev/null || true
}

# "digest size" of the layers SOCK already holds for kubetune.local/ images (from their manifests).
known_layers() {
  local sock=$1 m
  ctr --address "$sock" -n k8s.io images ls | awk 'NR > 1 && $1 ~ /^kubetune\.local\// {print $3}' | sort -u \
    | while read -r m; do ctr --address "$sock" -n k8s.io content get "$m" && echo; done \
    | python3 -c 'import json, sys
present = set(open(sys.argv[1]).read().split())
seen = set()
for line in filter(None, map(str.strip, sys.stdin)):
    for layer in json.loads(line).get("layers", []):
        if layer["digest"] in present and layer["digest"] not in seen:
            seen.add(layer["digest"]); print(layer["digest"], layer["size"])' \
      <(ctr --address "$sock" -n k8s.io content ls -q)
}

# docker save (stdin) -> an OCI archive (stdout) without the layers containerd already has
# (argv[1]: "digest size" lines). An image whose sources changed then sends its new layers only,
# instead of containerd hashing and writing GBs of torch again. A big layer of a known size is taken
# for that known layer and checked against the config's diff_ids at the end (exit 3 if wrong: the
# caller then imports in full); the other layers stream through (containerd digests what it
# ingests, whatever the entry's name). The manifests are byte for byte the ones containerd writes
# for a docker-archive import, so the image is the same either way.
LOAD_FILTER=$(cat <<'PY'
import hashlib, io, json, os, sys, tarfile  # noqa: E401
by_size = {}
for line in open(sys.argv[1]):
    d, size = line.split()
    by_size.setdefault(int(size), []).append(d)
inp = tarfile.open(fileobj=sys.stdin.buffer, mode="r|")
out = tarfile.open(fileobj=sys.stdout.buffer, mode="w|", format=tarfile.PAX_FORMAT)
sent, digest_of, size_of, links, configs, manifest = set(), {}, {}, {}, {}, None
skipped = 0


class Hashing:  # a reader that hashes what passes through it
    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def read(self, n=-1):
        b = self.f.read(n)
        self.h.update(b)
        return b


def add(name, f, size):
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o644
    out.addfile(info, f)


def add_blob(data):
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    if d not in sent:
        add("blobs/sha256/" + d[7:], io.BytesIO(data), len(data))
        sent.add(d)
    return d


layout = b'{"imageLayoutVersion":"1.0.0"}'
add("oci-layout", io.BytesIO(layout), len(layout))
for m in inp:
    if m.issym():
        links[m.name] = os.path.normpath(os.path.join(os.path.dirname(m.name), m.linkname))
    elif m.islnk():
        links[m.name] = m.linkname
    elif not m.isfile():
        pass
    elif m.name.endswith("/layer.tar"):
        size_of[m.name] = m.size
        f = inp.extractfile(m)
        candidates = by_size.get(m.size, [])
        if m.size >= 32 << 20 and len(candidates) == 1:  # checked against diff_ids below
            while f.read(1 << 20):
                pass
            digest_of[m.name] = candidates[0]
            skipped += m.size
        else:  # containerd names what it ingests by digest itself: any entry name will do
            f = Hashing(f)
            add("layers/" + m.name, f, m.size)
            digest_of[m.name] = "sha256:" + f.h.hexdigest()
    elif m.name == "manifest.json":
        manifest = json.load(inp.extractfile(m))
    elif m.name.endswith(".json") and "/" not in m.name:
        configs[m.name] = inp.extractfile(m).read()
if manifest is None:
    sys.exit("load: no manifest.json in the docker save stream")
index = []
for entry in manifest:
    config = configs[entry["Config"]]
    diff_ids = json.loads(config)["rootfs"]["diff_ids"]
    layers = []
    for path, diff_id in zip(entry["Layers"], diff_ids, strict=True):
        while path in links:
            path = links[path]
        if digest_of.get(path) != diff_id:
            print(f"load: {path} is not {diff_id}", file=sys.stderr)
            sys.exit(3)
        layers.append({"mediaType": "application/vnd.docker.image.rootfs.diff.tar",
                       "digest": diff_id, "size": size_of[path]})
    config_desc = {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": add_blob(config), "size": len(config)}
    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                       "config": config_desc, "layers": layers}, separators=(",", ":")).encode()
    digest = add_blob(body)
    for tag in entry.get("RepoTags") or []:
        index.append({"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": digest,
                      "size": len(body), "annotations": {"io.containerd.image.name": tag}})
body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                   "manifests": index}, separators=(",", ":")).encode()
add("index.json", io.BytesIO(body), len(body))
out.close()
print(f"load: left out {skipped / 2**30:.2f} GiB of layers containerd already has", file=sys.stderr)
PY
)

load() {
  local sock="" t0=$SECONDS
  while (($#)); do
    case $1 in
      --address) sock=${2:-}; shift 2 || die "--address needs a value" ;;
      --address=*) sock=${1#--address=}; shift ;;
      *) die "load: unknown argument '$1' (usage: load --address SOCK)" ;;
    esac
  done
  [[ -n $sock ]] || die "usage: $0 load --address /path/to/containerd.sock"
  [[ -S $sock ]] || die "$sock is not a socket (is containerd running?)"
  need ctr containerd
  need python3 python3
  [[ -f $IMAGES/images.env ]] || die "$IMAGES/images.env missing: run 'bash hack/images.sh build' first"
  timed "dockerd" start_dockerd
  lock -s
  # shellcheck disable=SC1091
  source "$IMAGES/images.env"
  local ref id todo=()
  for ref in "$OPERATOR_IMAGE" "$TRAINER_IMAGE" "$PAUSE_IMAGE"; do
    id=$($DOCKER image inspect -f '{{.Id}}' "$ref" 2>/dev/null) || die "$ref not in docker: run 'bash hack/images.sh build'"
    if [[ $(ctr_config_digest "$sock" "$ref") == "$id" ]]; then
      say "$ref: already in $sock (k8s.io)"
    else
      todo+=("$ref")
    fi
  done
  if ((${#todo[@]})); then
    say "importing ${todo[*]} into $sock (k8s.io)"
    local t1=$SECONDS known ok=""
    known=$(mktemp)
    # Only this image's own layers count as known (a rebuilt layer may have an old one's size).
    known_layers "$sock" 2>/dev/null | awk 'NR == FNR {mine[$1]; next} $1 in mine' \
      <($DOCKER image inspect -f '{{range .RootFS.Layers}}{{println .}}{{end}}' "${todo[@]}") - \
      >"$known" || : >"$known"
    if [[ -s $known ]]; then
      if $DOCKER save "${todo[@]}" | python3 -c "$LOAD_FILTER" "$known" \
          | ctr --address "$sock" -n k8s.io images import - >/dev/null; then
        ok=1
      else
        say "import without the known layers failed; importing in full"
      fi
    fi
    rm -f "$known"
    [[ -n $ok ]] || $DOCKER save "${todo[@]}" | ctr --address "$sock" -n k8s.io images import - >/dev/null
    say "import: $((SECONDS - t1))s"
    for ref in "${todo[@]}"; do
      [[ $(ctr_config_digest "$sock" "$ref") == $($DOCKER image inspect -f '{{.Id}}' "$ref") ]] \
        || die "$ref: not in $sock after the import"
    done
  fi
  say "load: $((SECONDS - t0))s"
}

cmd=${1:-all}
(($#)) && shift
case $cmd in
  dockerd) start_dockerd ;;
  build | all) build ;;
  load) load "$@" ;;
  -h | --help | help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) die "unknown command '$cmd' (dockerd|build|load --address SOCK|all)" ;;
esac
