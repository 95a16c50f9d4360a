-- Dry-run primitives: pools reserved without memory, plans estimated from
-- their layout alone, and checkpoint rows read in one call.
local ws = require("ws")

local function message_of(fn, ...)
    local ok, err = pcall(fn, ...)
    assert.is_false(ok, "expected an error")
    return tostring(err)
end

describe("a reserve_only pool", function()
    it("maps nothing, yet lays tensors out until its first wake", function()
        local pool <close> = assert(ws.pool{ device = "cpu", tag = "dry", bytes = 1 << 30,
                                             reserve_only = true })
        local st = pool:stats()
        assert.are.equal(0, st.mapped)
        assert.is_true(st.asleep)
        local t <close> = assert(pool:tensor{ shape = { 1 << 20 }, dtype = "bf16", name = "w" })
        assert.are.equal(0, pool:stats().mapped)
        assert.matches("tensor 'w' in pool 'dry' cannot be written: the pool is asleep",
                       message_of(t.fill, t, 1))
        assert.matches("tensor 'w' in pool 'dry' cannot be read: the pool is asleep",
                       message_of(t.checksum, t, 0))
        assert.matches("was reserved without memory %(a dry run%) and has never been awake",
                       message_of(pool.sleep, pool, 1))
        assert(pool:wake())
        t:fill(2)
        assert.are.equal(2, t:get(1))
        assert.are.equal(1 << 30, pool:stats().mapped)
    end)

    it("refuses a non-boolean reserve_only", function()
        assert.matches("reserve_only must be a boolean",
                       message_of(ws.pool, { bytes = 4096, reserve_only = "yes" }))
    end)
end)

describe("plan:estimate", function()
    it("reports an execution's buckets and bytes without touching memory", function()
        local src_pool <close> = assert(ws.pool{ device = "cpu", tag = "src", bytes = 1 << 24,
                                                 reserve_only = true })
        local dst_pool <close> = assert(ws.pool{ device = "cpu", tag = "dst", bytes = 1 << 24,
                                                 reserve_only = true })
        local srcs, dsts, numels = {}, {}, {}
        for i = 1, 8 do
            srcs[i] = assert(src_pool:tensor{ shape = { 100000 }, dtype = "bf16", name = "s" .. i })
            dsts[i] = assert(dst_pool:tensor{ shape = { 100000 }, dtype = "bf16", name = "d" .. i })
            numels[i] = 100000
        end
        local plan <close> = assert(ws.plan{ bucket_bytes = 500000, device = "cpu", name = "dry" })
        plan:add(srcs, dsts, numels)
        local est = plan:estimate()
        assert.are.equal(8, est.entries)
        assert.are.equal(8 * 200000, est.bytes_moved)
        -- 200,000-byte tensors in 500,000-byte buckets: two and a half per bucket.
        assert.are.equal(4, est.buckets)
        assert.are.equal(0, est.staging_bytes) -- a world of one stages nothing
        assert.are.equal(0, dst_pool:stats().mapped)
        assert.matches("plan 'dry': entry 1: src: tensor 's1' in pool 'src' cannot be read",
                       message_of(plan.execute, plan))
        plan:free()
        for i = 1, 8 do
            srcs[i]:free()
            dsts[i]:free()
        end
    end)
end)

describe("ck:read_rows", function()
    local dir, path
    setup(function()
        dir = os.tmpname()
        os.remove(dir)
        assert(ws.mkdir(dir))
        path = dir .. "/rows.safetensors"
        local a = assert(ws.tensor{ shape = { 6, 5 }, dtype = "bf16", device = "cpu", name = "a" })
        local b = assert(ws.tensor{ shape = { 7 }, dtype = "f32", device = "cpu", name = "b" })
        for i = 1, 30 do a:set(i, i) end
        for i = 1, 7 do b:set(i, -i) end
        assert(ws.save_safetensors(path, { "a", "b" }, { a, b }))
        a:free()
        b:free()
    end)
    teardown(function() os.execute("rm -rf '" .. dir .. "'") end)

    it("copies rows of several tensors in one call, converting where dtypes differ", function()
        local ck <close> = assert(ws.safetensors(path))
        local same <close> = assert(ws.tensor{ shape = { 10 }, dtype = "bf16", device = "cpu" })
        local conv <close> = assert(ws.tensor{ shape = { 10 }, dtype = "f32", device = "cpu" })
        local tail <close> = assert(ws.tensor{ shape = { 3 }, dtype = "bf16", device = "cpu" })
        ck:read_rows({ same, conv, tail }, { "a", "a", "b" }, { 5, 20, 4 })
        for i = 1, 10 do
            assert.are.equal(5 + i, same:get(i)) -- elements 6..15 (0-based 5..14)
            assert.are.equal(20 + i, conv:get(i))
        end
        assert.are.same({ -5, -6, -7 }, { tail:get(1), tail:get(2), tail:get(3) })
    end)

    it("names the tensor when the rows fall outside it, and raises for bad lists", function()
        local ck <close> = assert(ws.safetensors(path))
        local t <close> = assert(ws.tensor{ shape = { 4 }, dtype = "f32", device = "cpu" })
        assert.matches("tensor 'b' has 7 elements; 4 elements from element 5 are outside it",
                       message_of(ck.read_rows, ck, { t }, { "b" }, { 5 }))
        assert.matches("has no tensor 'zz'", message_of(ck.read_rows, ck, { t }, { "zz" }, { 0 }))
        assert.matches("firsts%[1%] must be an integer >= 0",
                       message_of(ck.read_rows, ck, { t }, { "b" }, { -1 }))
        assert.matches("the lists pair up", message_of(ck.read_rows, ck, { t }, {}, {}))
    end)
end)
