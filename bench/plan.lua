-- The benches' plan: a temporary directory holding plan.csv, rows productKey pk_demo,
-- OLD-n -> NEW-n for n = first .. first+rows-1. Returns dir, plan path.
return function(first, rows)
  local dir = os.tmpname()
  os.remove(dir)
  os.execute("mkdir -p " .. dir)
  local plan = dir .. "/plan.csv"
  local f = assert(io.open(plan, "w"))
  f:write("productKey,deviceKey,newDeviceKey\n")
  for i = first, first + rows - 1 do f:write(("pk_demo,OLD-%07d,NEW-%07d\n"):format(i, i)) end
  f:close()
  return dir, plan
end
