#!/usr/bin/env bash
# Prerequisites of the browser test (tests/test_ohif.py), idempotent and quiet:
#   - Debian's Orthanc with its DICOMweb plugin (ServeFolders ships with orthanc itself),
#   - Debian's Chromium (driven by playwright-core; no browser is downloaded),
#   - the npm packages pinned in package-lock.json: the prebuilt OHIF viewer (@ohif/app,
#     whose dist/ is all we use) and playwright-core.
# Fast when everything is there: it checks files and a stamp of the lock file.
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive

packages=()
[ -x /usr/sbin/Orthanc ] || packages+=(orthanc)
compgen -G '/usr/share/orthanc/plugins/libOrthancDicomWeb.so*' >/dev/null || packages+=(orthanc-dicomweb)
[ -x /usr/bin/chromium ] || packages+=(chromium)
if ((${#packages[@]})); then
  echo "tests/browser/setup.sh: apt-get install ${packages[*]}"
  apt-get update -qq
  apt-get install -y -qq "${packages[@]}" >/dev/null
fi

# @ohif/app lists its build-time dependencies as dependencies, some of which the registry
# cannot resolve (e.g. @ohif/i18n@3.13.2); package.json overrides them all with the empty
# ohif-dep-stub package, since the prebuilt dist/ bundles everything it needs.
stamp=node_modules/.cradle-package-lock.sha256
want="$(sha256sum package-lock.json | cut -d' ' -f1)"
if [ ! -f node_modules/@ohif/app/dist/index.html ] || [ ! -f node_modules/playwright-core/package.json ] \
   || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "tests/browser/setup.sh: npm ci (OHIF viewer, playwright-core)"
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null
  echo "$want" >"$stamp"
fi
