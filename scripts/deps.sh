#!/usr/bin/env bash
# Installs the system packages the agent's tests, demo and benchmarks need, only when missing.
# Runs as root on Debian 12 (or Ubuntu); safe to run again.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have nft || need+=(nftables)
have nsenter || need+=(util-linux)
have setpriv || need+=(util-linux)
have ip || need+=(iproute2)
have nats-server || need+=(nats-server)
have monit || need+=(monit)
have dnsmasq || need+=(dnsmasq-base)
have make || need+=(make)
# The director's blobstore for the DAV tests (Debian's build has the dav and ssl modules);
# openssl makes its htpasswd entries.
[ -x /usr/sbin/nginx ] || need+=(nginx)
have openssl || need+=(openssl)
# curl is the deploy benchmark's measure of the limit (curl | tar) and of upstream's pipeline.
have curl || need+=(curl)
# The settings source tests: filesystem images (mke2fs -d) on loop devices, and eject (the
# CD-ROM source ejects the disc after reading it, as upstream).
have mke2fs || need+=(e2fsprogs)
have losetup || need+=(mount)
have eject || need+=(eject)
# Persistent disks: sfdisk (fdisk), parted, growpart (cloud-guest-utils), mkfs.xfs and
# xfs_growfs (xfsprogs), resize2fs (e2fsprogs); the disk tests set an xattr (attr).
have sfdisk || need+=(fdisk)
have parted || need+=(parted)
have growpart || need+=(cloud-guest-utils)
have mkfs.xfs || need+=(xfsprogs)
have setfattr || need+=(attr)
# Bridge netfilter: the agent loads br_netfilter when a bridge exists and egress rules apply.
have modprobe || need+=(kmod)
# bench-egress profiles the rules' share of each packet's CPU (perf record -e cpu-clock).
have perf || need+=(linux-perf)
# bench-fleet times the nodes' SYN-ACKs (the kernel's connects) beside nats-server's accepts.
have tcpdump || need+=(tcpdump)

if [ "$(id -u)" != 0 ]; then
  echo "deps: must run as root (the agent and its tests manage nftables, namespaces and cgroups)" >&2
  exit 1
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "deps: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi
if ! /usr/sbin/nginx -V 2>&1 | grep -q -- --with-http_dav_module; then
  echo "deps: /usr/sbin/nginx has no DAV module (the blobstore tests need Debian's nginx)" >&2
  exit 1
fi
# Debian starts the services these packages ship; the tests run their own instances on
# loopback inside namespaces, so the packaged daemons are left as the system has them.
if ! have cargo; then
  echo "deps: cargo is missing: install the Rust toolchain (rustup) first" >&2
  exit 1
fi
