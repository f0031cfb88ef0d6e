# Sourced by asan.sh and valgrind.sh: the spec files to run, from $SPECS, --quick or the whole suite.
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
if [ -n "${SPECS:-}" ]; then
  specs=($SPECS)
elif [ $QUICK = 1 ]; then
  specs=(spec/1*_spec.lua spec/20_client_sim_spec.lua)
else
  specs=(spec)
fi
