# Sourced (from the repository root) by scripts/test.sh and bench/device_tests.sh: everything a
# test run writes (temporary files, IPython and Jupyter state, colabswarm's cache) goes under
# .work/, never into the user's home; $work is that folder.
work="$PWD/.work"
rm -rf "$work/pytest"
mkdir -p "$work/tmp" "$work/ipython" "$work/jupyter/config" "$work/jupyter/data" \
         "$work/jupyter/runtime" "$work/xdg" "$work/cache"
export TMPDIR="$work/tmp" IPYTHONDIR="$work/ipython" XDG_CONFIG_HOME="$work/xdg" \
       JUPYTER_CONFIG_DIR="$work/jupyter/config" JUPYTER_DATA_DIR="$work/jupyter/data" \
       JUPYTER_RUNTIME_DIR="$work/jupyter/runtime" COLABSWARM_CACHE="$work/cache" \
       MPLCONFIGDIR="$work/tmp" PYTHONDONTWRITEBYTECODE=1
