#!/usr/bin/env bash
# Builds the repository's Dockerfile, unmodified, and checks that the image's proxy answers a
# request through the Meraki stand-in. For machines without a Docker daemon or registry access
# (CI): on a normal machine `docker build .` is all it takes.
#
#   (a) stand-ins for the Dockerfile's base images, made with debootstrap from this machine's
#       Debian mirror and tagged with the FROM names: debian:bookworm-slim (minbase, docs
#       trimmed like the official slim image) and rust:1-bookworm (bookworm + a C toolchain +
#       this machine's Rust toolchain, with the official rust image's CARGO_HOME/RUSTUP_HOME/PATH);
#   (b) `buildah bud --isolation chroot --storage-driver vfs --pull=never` of the Dockerfile;
#   (c) the image's own ENTRYPOINT/CMD, run as the image's USER with a config directory and a
#       state volume bind-mounted, in front of the stand-in on 127.0.0.1; a grant imported with
#       the image's binary, then a client request through the image's proxy must get 200 and
#       the stand-in's organization;
#   (d) the image's size; deploy/systemd/meraki-oauth-proxy.service checked with
#       `systemd-analyze verify` against the image's binary, and its exposure score;
#   (e) that unit, unmodified, booted: bookworm with systemd in systemd-nspawn, the image's
#       binary, credentials as deploy/README.md sets them up, a grant imported with the README's
#       nsenter recipe; a request through the service must get 200, also after a reload.
#
# Needs root and these Debian packages (CI installs them; this script installs nothing):
#   buildah debootstrap curl python3 systemd systemd-container, and what building the stand-in needs
#   (cargo/rustc from rustup, cmake, build-essential). Network: the Debian mirror (debootstrap,
#   and the Dockerfile's apt-get) and crates.io (the Dockerfile's cargo build).
#
# The debootstrap root filesystems are cached as tarballs under IMAGE_CACHE (default
# /var/tmp/meraki-image-cache), with buildah's own storage, so a rerun skips (a). Other knobs:
# IMAGE_TAG (default localhost/meraki-oauth-proxy:ci), STANDIN_BIN (a prebuilt stand-in),
# IMAGE_SKIP_BUILD=1 (reuse the image IMAGE_TAG names, to iterate on the steps after (b)).
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "image-test: needs root (debootstrap, buildah --isolation chroot)" >&2; exit 1; }
for tool in buildah debootstrap curl python3 systemd-analyze systemd-nspawn nsenter cargo rustc; do
  command -v "$tool" >/dev/null 2>&1 || { echo "image-test: $tool is missing (see the package list at the top)" >&2; exit 1; }
done

cache=${IMAGE_CACHE:-/var/tmp/meraki-image-cache}
image=${IMAGE_TAG:-localhost/meraki-oauth-proxy:ci}
suite=bookworm
mkdir -p "$cache"
# A private buildah store: nothing outside IMAGE_CACHE is touched, and no registry is asked.
B=(buildah --root "$cache/storage" --runroot "$cache/runroot" --storage-driver vfs)
export BUILDAH_ISOLATION=chroot

work=$(mktemp -d /tmp/meraki-image-test.XXXXXX)
pids=()
containers=()
init=""
cleanup() {
  set +e
  # A booted container's init first: killing systemd-nspawn alone would leave it running.
  [ -z "$init" ] || kill -KILL "$init" 2>/dev/null
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
  done
  for ctr in "${containers[@]}"; do "${B[@]}" rm "$ctr" >/dev/null 2>&1; done
  # A debootstrap interrupted half way can leave /proc or /sys mounted in its target.
  grep -o " $work/[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
  rm -rf "$work"
}
trap cleanup EXIT
elapsed() { echo "$((SECONDS - $1)) s"; }

# ---------------------------------------------------------------------------------------------
# (a) Stand-in base images.

# The machine's Debian mirror for a suite: deb822 sources first, then one-line sources.
mirror_for() {
  local want=$1 uri=""
  if [ -r /etc/apt/sources.list.d/debian.sources ]; then
    uri=$(awk -v want="$want" 'BEGIN { RS = "" } {
        uri = ""; ok = 0; n = split($0, line, "\n")
        for (i = 1; i <= n; i++) {
          k = split(line[i], w, /[ \t]+/)
          if (w[1] == "URIs:") uri = w[2]
          if (w[1] == "Suites:") for (j = 2; j <= k; j++) if (w[j] == want) ok = 1
          if (w[1] == "Enabled:" && w[2] == "no") { ok = 0; break }
        }
        if (ok && uri != "") { print uri; exit }
      }' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$uri" ]; then
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk -v want="$want" '
      $1 == "deb" { i = 2; if ($i ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
                    if ($(i + 1) == want) { print $i; exit } }')
  fi
  echo "$uri"
}
mirror=$(mirror_for "$suite")
mirror=${mirror:-http://deb.debian.org/debian}
security=$(mirror_for "$suite-security")
security=${security:-http://deb.debian.org/debian-security}
echo "== Debian mirror: $mirror (security: $security)"

# debootstrap into $1 with the remaining arguments; apt sources like the official images.
bootstrap() {
  local root=$1 log="$work/debootstrap.log"; shift
  mkdir -p "$root"
  if ! timeout 1800 debootstrap --variant=minbase "$@" "$suite" "$root" "$mirror" >"$log" 2>&1; then
    tail -n 30 "$log" >&2; echo "image-test: debootstrap failed" >&2; exit 1
  fi
  rm -f "$root/etc/apt/sources.list"
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  # The official images' apt settings (debuerreotype): no package caches or downloaded .debs
  # left in a layer, no translations.
  cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF2'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF2
  echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
  echo 'Acquire::GzipIndexes "true";' >"$root/etc/apt/apt.conf.d/docker-gzip-indexes"
  echo 'Apt::AutoRemove::SuggestsImportant "false";' >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
  chroot "$root" apt-get clean
  rm -f "$root"/var/cache/apt/*.bin
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/log/apt/* "$root"/var/log/dpkg.log \
    "$root"/var/cache/debconf/*-old
}
# A root filesystem as a tarball: no device nodes, nothing under /proc or /sys.
pack() {
  tar --numeric-owner -C "$1" --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
    -cf "$2.part" . && mv "$2.part" "$2"
}

slim_packages=""
rust_packages="build-essential,ca-certificates,curl,git,pkg-config,netbase"
sysroot=$(rustc --print sysroot)
toolchain=$(basename "$sysroot")
rust_version=$(rustc --version | awk '{print $2}')
key() { printf '%s\n' "$@" | sha256sum | cut -c1-12; }
slim_tar="$cache/debian-$suite-slim-$(key v2 "$mirror" "$security" "$slim_packages").tar"
# The build stage fetches crates from crates.io. Where this machine's egress passes a TLS-inspecting
# proxy, its local CAs (/usr/local/share/ca-certificates) are trusted by the build-stage stand-in
# too, as a site's own base image would; never by the runtime stand-in, so the image does not
# ship them.
mapfile -t local_cas < <(find /usr/local/share/ca-certificates -name '*.crt' -type f 2>/dev/null | sort)
rust_tar="$cache/rust-1-$suite-$(key v2 "$mirror" "$security" "$rust_packages" "$(rustc -vV)" "$sysroot" \
  "$(cat "${local_cas[@]}" </dev/null | sha256sum)").tar"

if [ ! -s "$slim_tar" ]; then
  echo "== debootstrap $suite (minbase) -> $slim_tar"
  t=$SECONDS
  root="$work/slim"
  bootstrap "$root"
  # What the official slim image leaves out: documentation, manual pages and locales, now and in
  # whatever apt installs later (its /etc/dpkg/dpkg.cfg.d/docker).
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$root"/usr/share/{man,groff,info,lintian,linda,locale}/*
  pack "$root" "$slim_tar"
  rm -rf "$root"
  echo "   $(du -h "$slim_tar" | cut -f1), $(elapsed $t)"
fi

if [ ! -s "$rust_tar" ]; then
  echo "== debootstrap $suite + C toolchain + Rust $rust_version ($sysroot) -> $rust_tar"
  t=$SECONDS
  root="$work/rust"
  bootstrap "$root" --include="$rust_packages"
  if [ "${#local_cas[@]}" -gt 0 ]; then
    cp "${local_cas[@]}" "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1
  fi
  # Laid out like the official rust image: toolchains under RUSTUP_HOME, commands in
  # CARGO_HOME/bin (here links into the toolchain; rustup itself is not needed to build).
  dest="$root/usr/local/rustup/toolchains/$toolchain"
  mkdir -p "$dest" "$root/usr/local/cargo/bin"
  tar -C "$sysroot" --exclude=./share/doc -cf - . | tar -C "$dest" -xf -
  for cmd in "$dest"/bin/*; do
    ln -s "/usr/local/rustup/toolchains/$toolchain/bin/$(basename "$cmd")" "$root/usr/local/cargo/bin/"
  done
  pack "$root" "$rust_tar"
  rm -rf "$root"
  echo "   $(du -h "$rust_tar" | cut -f1), $(elapsed $t)"
fi

# Imports tarball $1 as image $2 (remaining arguments: `buildah config` options), unless the
# image already holds that tarball.
import_base() {
  local tar=$1 name=$2 have ctr; shift 2
  have=$("${B[@]}" inspect --type image \
    --format '{{index .OCIv1.Config.Labels "io.github.meraki-oauth-proxy.stand-in"}}' "$name" 2>/dev/null || true)
  if [ "$have" = "$(basename "$tar")" ]; then echo "   $name: up to date"; return; fi
  local t=$SECONDS old
  old=$("${B[@]}" inspect --type image --format '{{.FromImageID}}' "$name" 2>/dev/null || true)
  ctr=$("${B[@]}" from --quiet scratch)
  containers+=("$ctr")
  "${B[@]}" add --quiet "$ctr" "$tar" / >/dev/null
  "${B[@]}" config --os linux --arch amd64 --cmd bash \
    --label "io.github.meraki-oauth-proxy.stand-in=$(basename "$tar")" "$@" "$ctr"
  "${B[@]}" commit --quiet --rm "$ctr" "$name" >/dev/null
  # The stand-in it replaces (another mirror or toolchain) would otherwise stay, untagged.
  [ -z "$old" ] || "${B[@]}" rmi "$old" >/dev/null 2>&1 || true
  echo "   $name: imported, $(elapsed $t)"
}
echo "== stand-in base images"
# Short names in FROM resolve to docker.io/library/...; with --pull=never they are found here.
import_base "$slim_tar" docker.io/library/debian:bookworm-slim
import_base "$rust_tar" docker.io/library/rust:1-bookworm \
  --env RUSTUP_HOME=/usr/local/rustup --env CARGO_HOME=/usr/local/cargo \
  --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env RUST_VERSION="$rust_version"

# ---------------------------------------------------------------------------------------------
# (b) The Dockerfile, as it is.
if [ "${IMAGE_SKIP_BUILD:-}" = 1 ] && "${B[@]}" inspect --type image "$image" >/dev/null 2>&1; then
  echo "== IMAGE_SKIP_BUILD=1: reusing $image"
else
  echo "== buildah bud Dockerfile -> $image"
  old_id=$("${B[@]}" inspect --type image --format '{{.FromImageID}}' "$image" 2>/dev/null || true)
  t=$SECONDS
  timeout 3600 "${B[@]}" bud --pull=never --isolation chroot --layers=false \
    --iidfile "$work/iid" --tag "$image" --file Dockerfile .
  echo "   built $(cut -c1-19 "$work/iid") in $(elapsed $t)"
  # The previous build of this tag, untagged now, would otherwise pile up.
  if [ -n "$old_id" ] && [ "$old_id" != "$(sed 's/^sha256://' "$work/iid")" ]; then
    "${B[@]}" rmi "$old_id" >/dev/null 2>&1 || true
  fi
fi

# ---------------------------------------------------------------------------------------------
# (c) The image's proxy in front of the stand-in.
echo "== the image's proxy in front of the Meraki stand-in"
if [ -n "${STANDIN_BIN:-}" ]; then
  standin_bin=$STANDIN_BIN
else
  timeout 1800 cargo build --quiet --example meraki_standin
  target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  standin_bin="$target_dir/debug/examples/meraki_standin"
fi
"$standin_bin" --listen 127.0.0.1:0 >"$work/standin.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do grep -q '^refresh_token=' "$work/standin.out" && break; sleep 0.1; done
get() { sed -n "s/^$1=//p" "$work/standin.out" | head -n 1; }
[ -n "$(get refresh_token)" ] || { cat "$work/standin.out" >&2; echo "image-test: the stand-in did not start" >&2; exit 1; }

free_ports() {
  python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))'
}
read -r proxy_port admin_port < <(free_ports)

ctr=$("${B[@]}" from --pull=never --name "meraki-image-test-$$" "$image")
containers+=("$ctr")
user=$("${B[@]}" inspect --type image --format '{{.OCIv1.Config.User}}' "$image")
uid=${user%%:*}
# Where `docker run -v` replaces an image VOLUME with the given directory, buildah 1.28 mounts
# its own directory at the same place too, and which one wins varies: the working container (not
# the image) forgets its VOLUMEs, so only the state directory below is mounted there.
mapfile -t volumes < <("${B[@]}" inspect --type image --format '{{range $v, $_ := .OCIv1.Config.Volumes}}{{println $v}}{{end}}' "$image")
for v in "${volumes[@]}"; do "${B[@]}" config --volume "$v-" "$ctr"; done
mapfile -t entrypoint < <("${B[@]}" inspect --type image --format '{{range .OCIv1.Config.Entrypoint}}{{println .}}{{end}}' "$image")
mapfile -t cmd < <("${B[@]}" inspect --type image --format '{{range .OCIv1.Config.Cmd}}{{println .}}{{end}}' "$image")
echo "   image: USER $user, ENTRYPOINT ${entrypoint[*]}, CMD ${cmd[*]}"

# The config directory (read only) and the state volume, as the deploy README describes them.
etc="$work/etc"; state="$work/state"
mkdir -p "$etc" "$state"
chmod 755 "$etc"
chown "$user" "$state" && chmod 700 "$state"
# --isolation chroot shares the host's network: 127.0.0.1 is the host's loopback.
mounts=(--volume "$etc:/etc/meraki-oauth-proxy:ro" --volume "$state:/var/lib/meraki-oauth-proxy")
run_in() {
  timeout 120 "${B[@]}" run --isolation chroot "${mounts[@]}" \
    --env STANDIN_CLIENT_SECRET="$(get client_secret)" "$ctr" -- "$@"
}
[ "$(run_in id -u)" = "$uid" ] || { echo "image-test: the container does not run as the image's USER $user" >&2; exit 1; }

client_key="image-test-client-key"
run_in "${entrypoint[@]}" store gen-key >"$etc/store.key"
chown "$user" "$etc/store.key" && chmod 400 "$etc/store.key"
cat >"$etc/proxy.toml" <<TOML
# Generated by scripts/image-test.sh: the image's proxy in front of the local Meraki stand-in.
[server]
listen = "127.0.0.1:$proxy_port"
admin_listen = "127.0.0.1:$admin_port"
threads = 1
[upstream]
api_base = "$(get api_base)"
token_url = "$(get token_url)"
authorize_url = "$(get authorize_url)"
revoke_url = "$(get revoke_url)"
[store]
path = "/var/lib/meraki-oauth-proxy/tokens.db"
key_file = "store.key"
[audit]
path = "/var/lib/meraki-oauth-proxy/audit.jsonl"
[[integrations]]
name = "standin"
client_id = "$(get client_id)"
client_secret_env = "STANDIN_CLIENT_SECRET"
redirect_uri = "http://127.0.0.1:$admin_port/oauth/callback"
scopes = ["dashboard:general:config:read"]
[[clients]]
name = "image-test"
key_sha256 = "$(printf %s "$client_key" | run_in "${entrypoint[@]}" hash-key)"
integration = "standin"
organizations = ["111111"]
TOML
get refresh_token >"$etc/refresh-token"
chown "$user" "$etc/refresh-token"
run_in "${entrypoint[@]}" --config /etc/meraki-oauth-proxy/proxy.toml \
  grants import --integration standin --org 111111 --refresh-token-file /etc/meraki-oauth-proxy/refresh-token
rm -f "$etc/refresh-token"

# The image's own ENTRYPOINT + CMD: `run --config /etc/meraki-oauth-proxy/proxy.toml`.
# Started as a simple command, so $! is buildah itself: SIGTERM to it reaches the proxy.
"${B[@]}" run --isolation chroot "${mounts[@]}" --env STANDIN_CLIENT_SECRET="$(get client_secret)" \
  "$ctr" -- "${entrypoint[@]}" "${cmd[@]}" >"$work/proxy.log" 2>&1 &
proxy=$!
pids+=("$proxy")
ready=""
for _ in $(seq 1 300); do
  if curl -fsS --max-time 2 "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1; then ready=1; break; fi
  kill -0 "$proxy" 2>/dev/null || break
  sleep 0.2
done
[ -n "$ready" ] || { cat "$work/proxy.log" >&2; echo "image-test: the image's proxy did not become ready" >&2; exit 1; }

status=$(curl -sS --max-time 10 -o "$work/body" -w '%{http_code}' \
  -H "X-Cisco-Meraki-API-Key: $client_key" "http://127.0.0.1:$proxy_port/api/v1/organizations")
if [ "$status" != 200 ] || ! grep -q '"111111"' "$work/body"; then
  echo "image-test: GET /api/v1/organizations through the image's proxy: $status $(head -c 300 "$work/body")" >&2
  cat "$work/proxy.log" >&2
  exit 1
fi
echo "   GET /api/v1/organizations through the image's proxy: $status $(head -c 120 "$work/body")"
# The same request without a client key is refused by the proxy, not forwarded.
status=$(curl -sS --max-time 10 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$proxy_port/api/v1/organizations")
[ "$status" = 401 ] || { echo "image-test: a request without a key got $status, expected 401" >&2; exit 1; }
# The audit log landed in the state volume, written by the image's user.
for _ in $(seq 1 50); do grep -q '"client":"image-test"' "$state/audit.jsonl" 2>/dev/null && break; sleep 0.1; done
[ -s "$state/tokens.db" ] && grep -q '"client":"image-test"' "$state/audit.jsonl" 2>/dev/null \
  || { ls -la "$state" >&2; tail -n 5 "$state/audit.jsonl" >&2; echo "image-test: no token store or no audit record in the state volume" >&2; exit 1; }
[ "$(stat -c %u "$state/audit.jsonl")" = "$uid" ] \
  || { echo "image-test: the audit log is not owned by the image's user" >&2; exit 1; }
echo "   token store and audit record written to the state volume as uid $uid"
# `docker stop`: SIGTERM, and with nothing in flight the proxy is gone at once (within 10 s).
stop_start=$(date +%s%N)
kill -TERM "$proxy"
for _ in $(seq 1 100); do kill -0 "$proxy" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$proxy" 2>/dev/null || curl -s --max-time 2 -o /dev/null "http://127.0.0.1:$proxy_port/"; then
  echo "image-test: the image's proxy did not stop within 10 s of SIGTERM" >&2; exit 1
fi
echo "   SIGTERM: the image's proxy stopped in $(( ($(date +%s%N) - stop_start) / 1000000 )) ms"

# ---------------------------------------------------------------------------------------------
# (d) The image's size, then the systemd unit against the image's binary.
mnt=$("${B[@]}" mount "$ctr")
size=$("${B[@]}" images --format '{{.Size}}' "$image" | head -n 1)
bin_size=$(du -h "$mnt/usr/local/bin/meraki-oauth-proxy" | cut -f1)
# What a registry would store and a pull would fetch: the layers gzip-compressed.
"${B[@]}" push --quiet "$image" "oci-archive:$work/image.tar" >/dev/null
echo "== image $image: $size ($(du -h "$work/image.tar" | cut -f1) compressed; the proxy binary: $bin_size)"
rm -f "$work/image.tar"

echo "== deploy/systemd/meraki-oauth-proxy.service"
# A root for systemd-analyze: the image's binary where the unit expects it, /bin/kill for
# ExecReload= (merged /usr, as on Debian), and this machine's system units (sysinit.target...).
root="$work/unit-root"
mkdir -p "$root/usr/local/bin" "$root/usr/bin" "$root/usr/lib/systemd" "$root/etc/systemd/system"
ln -s usr/bin "$root/bin"
cp "$mnt/usr/local/bin/meraki-oauth-proxy" "$root/usr/local/bin/"
"${B[@]}" umount "$ctr" >/dev/null
cp /usr/bin/kill "$root/usr/bin/"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
cp deploy/systemd/meraki-oauth-proxy.service "$root/etc/systemd/system/"
# Unknown keys are only warnings: any output counts as a failure.
if ! systemd-analyze verify --root="$root" meraki-oauth-proxy.service >"$work/verify.log" 2>&1 \
  || [ -s "$work/verify.log" ]; then
  cat "$work/verify.log" >&2; echo "image-test: systemd-analyze verify complains" >&2; exit 1
fi
echo "   systemd-analyze verify: clean"
systemd-analyze security --offline=true --root="$root" meraki-oauth-proxy.service >"$work/security.log" 2>&1 || true
grep -E 'Overall exposure level' "$work/security.log" | sed 's/^/   /' || cat "$work/security.log"
# ---------------------------------------------------------------------------------------------
# (e) The systemd unit, booted: a Debian bookworm with systemd in systemd-nspawn (sharing the
# host's network), the image's binary and the unmodified unit, the store key and the client
# secret as credential sources. The grant is imported with deploy/README.md's systemd-run
# recipe, as the running service's user in its namespaces; then a request through the service
# must get 200.
echo "== the systemd unit, booted in systemd-nspawn"
t=$SECONDS
# procps: /bin/kill, for the unit's ExecReload=.
sd_packages="systemd,systemd-sysv,dbus,ca-certificates,procps"
sd_tar="$cache/debian-$suite-systemd-$(key v2 "$mirror" "$security" "$sd_packages").tar"
if [ ! -s "$sd_tar" ]; then
  bootstrap "$work/sd" --include="$sd_packages"
  pack "$work/sd" "$sd_tar"
  rm -rf "$work/sd"
fi
sd="$work/sd"
mkdir -p "$sd" && tar -C "$sd" -xf "$sd_tar"
cp "$root/usr/local/bin/meraki-oauth-proxy" "$sd/usr/local/bin/"
cp deploy/systemd/meraki-oauth-proxy.service "$sd/etc/systemd/system/"
systemctl --root="$sd" --quiet enable meraki-oauth-proxy.service

# A second stand-in: the first one's grant now belongs to the image's proxy.
"$standin_bin" --listen 127.0.0.1:0 >"$work/standin2.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do grep -q '^refresh_token=' "$work/standin2.out" && break; sleep 0.1; done
get2() { sed -n "s/^$1=//p" "$work/standin2.out" | head -n 1; }
[ -n "$(get2 refresh_token)" ] || { cat "$work/standin2.out" >&2; echo "image-test: the second stand-in did not start" >&2; exit 1; }
read -r sd_port sd_admin_port < <(free_ports)

creds="$sd/etc/meraki-oauth-proxy/credentials"
install -d -m 700 "$creds"
(umask 077
 chroot "$sd" /usr/local/bin/meraki-oauth-proxy store gen-key >"$creds/store.key"
 printf %s "$(get2 client_secret)" >"$creds/netops-client-secret")
cat >"$sd/etc/meraki-oauth-proxy/proxy.toml" <<TOML
# Generated by scripts/image-test.sh: deploy/README.md's systemd configuration, stand-in upstream.
[server]
listen = "127.0.0.1:$sd_port"
admin_listen = "127.0.0.1:$sd_admin_port"
threads = 1
[upstream]
api_base = "$(get2 api_base)"
token_url = "$(get2 token_url)"
authorize_url = "$(get2 authorize_url)"
revoke_url = "$(get2 revoke_url)"
[store]
path = "/var/lib/meraki-oauth-proxy/tokens.db"
key_file = "/run/credentials/meraki-oauth-proxy.service/store.key"
[audit]
path = "/var/lib/meraki-oauth-proxy/audit.jsonl"
[[integrations]]
name = "netops"
client_id = "$(get2 client_id)"
client_secret_file = "/run/credentials/meraki-oauth-proxy.service/netops-client-secret"
redirect_uri = "http://127.0.0.1:$sd_admin_port/oauth/callback"
scopes = ["dashboard:general:config:read"]
[[clients]]
name = "image-test"
key_sha256 = "$(printf %s "$client_key" | chroot "$sd" /usr/local/bin/meraki-oauth-proxy hash-key)"
integration = "netops"
organizations = ["111111"]
TOML

systemd-nspawn --quiet --directory="$sd" --machine="meraki-unit-test-$$" --boot --register=no \
  --keep-unit --console=read-only >"$work/nspawn.log" 2>&1 &
nspawn=$!
pids+=("$nspawn")
init=""
for _ in $(seq 1 100); do
  # The container's init: the child of systemd-nspawn that runs systemd (not nspawn's own
  # short-lived helper).
  init=$(ps -o pid=,comm= --ppid "$nspawn" | awk '$2 == "systemd" { print $1; exit }' || true)
  [ -n "$init" ] && break
  sleep 0.1
done
[ -n "$init" ] || { cat "$work/nspawn.log" >&2; echo "image-test: systemd-nspawn did not start" >&2; exit 1; }
in_sd() { nsenter --target "$init" --all "$@"; }
# Booted: running, or degraded (a container lacks what some of Debian's units want).
boot=""
for _ in $(seq 1 300); do
  boot=$(in_sd systemctl is-system-running 2>/dev/null || true)
  case "$boot" in running|degraded) break ;; esac
  kill -0 "$nspawn" 2>/dev/null || break
  sleep 0.2
done
case "$boot" in running|degraded) ;; *)
  cat "$work/nspawn.log" >&2; echo "image-test: the container did not boot ('$boot')" >&2; exit 1 ;;
esac
sd_fail() {
  in_sd systemctl --no-pager status meraki-oauth-proxy.service >&2 || true
  in_sd journalctl --no-pager -u meraki-oauth-proxy.service >&2 || true
  echo "image-test: $1" >&2; exit 1
}
in_sd systemctl is-active --quiet meraki-oauth-proxy.service || sd_fail "the unit is not active"

# deploy/README.md's recipe, as it is written there (run in the booted container).
get2 refresh_token | timeout 60 nsenter --target "$init" --all sh -c '
  pid=$(systemctl show -P MainPID meraki-oauth-proxy)
  nsenter --target "$pid" --all --setuid "$(stat -c %u /proc/$pid)" --setgid "$(stat -c %g /proc/$pid)" \
    /usr/local/bin/meraki-oauth-proxy --config /etc/meraki-oauth-proxy/proxy.toml \
    grants import --integration netops --org 111111 --refresh-token-file -' >"$work/sd-import.log" 2>&1 \
  || { cat "$work/sd-import.log" >&2; sd_fail "grants import in the service's namespaces failed"; }
request_sd() {
  curl -sS --max-time 10 -o "$work/sd-body" -w '%{http_code}' \
    -H "X-Cisco-Meraki-API-Key: $client_key" "http://127.0.0.1:$sd_port/api/v1/organizations"
}
status=$(request_sd)
[ "$status" = 200 ] && grep -q '"111111"' "$work/sd-body" \
  || sd_fail "GET /api/v1/organizations through the unit: $status $(head -c 300 "$work/sd-body")"
echo "   GET /api/v1/organizations through the unit: $status"
# systemctl reload (SIGHUP) keeps it serving.
in_sd systemctl reload meraki-oauth-proxy.service || sd_fail "systemctl reload failed"
sleep 1
in_sd systemctl is-active --quiet meraki-oauth-proxy.service || sd_fail "the unit died on reload"
status=$(request_sd)
[ "$status" = 200 ] || sd_fail "after a reload: $status"
owner=$(stat -c '%u %a' "$sd/var/lib/private/meraki-oauth-proxy/audit.jsonl" 2>/dev/null || true)
case "$owner" in
  "0 "*|"") sd_fail "no audit log, or one owned by root, in the state directory: '$owner'" ;;
esac
echo "   grant imported as the service's dynamic user; reload kept it serving; audit log uid ${owner% *}, mode ${owner#* }"
in_sd systemctl --no-pager show -p MainPID,User,NRestarts meraki-oauth-proxy.service | tr '\n' ' ' | sed 's/^/   /'; echo
in_sd systemctl poweroff >/dev/null 2>&1 || true
for _ in $(seq 1 300); do kill -0 "$nspawn" 2>/dev/null || break; sleep 0.1; done
kill -0 "$nspawn" 2>/dev/null || init=""
echo "   $(elapsed $t)"
# Only the current tarballs are kept.
find "$cache" -maxdepth 1 -name '*.tar' ! -path "$slim_tar" ! -path "$rust_tar" ! -path "$sd_tar" -delete
echo "image-test: passed"
