#!/bin/sh
# Stands in for a compiler: produce an executable under $1.
set -eu
mkdir -p "$1"
printf '#!/bin/sh\necho "hello from app"\n' > "$1/app"
chmod 755 "$1/app"
