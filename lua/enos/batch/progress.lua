--- The batch's progress: what a progress callback receives, computed from the batch's counts.
-- @module enos.batch.progress
local M = {}

--- The progress record: {done (rows finished: done, skipped or failed), total, rate (rows/s finished by this
-- run, skipped rows excluded), eta (seconds, nil until a rate is known), retries, failed, elapsed (s), final,
-- paused (seconds left of a 429's pause, or nil), already (rows an earlier run finished)}. On a resume, done
-- and total leave out the rows the journal already held as done (stats.already), so "3/40" means 3 of the 40
-- rows this run has left.
-- @tparam table stats the batch's counts (total, done, skipped, failed, retries, already)
-- @tparam number elapsed seconds since the run started
-- @param paused seconds of pause left, or nil
-- @tparam boolean final whether the run has ended
function M.snapshot(stats, elapsed, paused, final)
  local already = stats.already or 0
  local finished = stats.done + stats.failed + math.max(0, stats.skipped - already)
  local total = stats.total - already
  local rate = elapsed > 0 and (stats.done + stats.failed) / elapsed or 0
  local eta = rate > 0 and math.max(0, total - finished) / rate or nil
  return { done = finished, total = total, rate = rate, eta = eta, retries = stats.retries,
    failed = stats.failed, elapsed = elapsed, final = final, paused = paused, already = already }
end

return M
