#!/usr/bin/env bash
# The speech synthesizers the digits corpus is made with (Debian packages): espeak-ng, flite,
# festival with three English voices and ten of other languages (Italian, Czech, Catalan,
# Russian, Finnish: real speakers reading respelled English digits), sox. Installs them as root;
# otherwise says what to install.
set -euo pipefail
need=()
for tool in espeak-ng flite festival sox; do command -v "$tool" > /dev/null || need+=("$tool"); done
for voice in english/kal_diphone english/ked_diphone us/cmu_us_slt_arctic_hts italian/lp_diphone italian/pc_diphone \
    czech/czech_dita czech/czech_krb czech/czech_machac czech/czech_ph catalan/upc_ca_ona_hts \
    russian/msu_ru_nsh_clunits finnish/suo_fi_lj_diphone finnish/hy_fi_mv_diphone; do
  [ -d "/usr/share/festival/voices/$voice" ] || need+=("festival voice $voice")
done
[ ${#need[@]} -eq 0 ] && exit 0
packages=(espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts sox festvox-italp16k
  festvox-itapc16k festival-czech festvox-czech-dita festvox-czech-krb festvox-czech-machac festvox-czech-ph
  festival-ca festvox-ca-ona-hts festvox-ru festvox-suopuhe-lj festvox-suopuhe-mv)
if [ "$(id -u)" -ne 0 ]; then
  echo "install_tts: missing ${need[*]}; as root run: apt-get install ${packages[*]}" >&2
  exit 1
fi
echo "install_tts: installing ${packages[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update -qq
apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${packages[@]}" > /dev/null
