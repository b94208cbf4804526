// interface: matmul_coop 6 (the bindings and sizes sdw passes; a --shader-dir file must name the same)
// Matrix product C = s A B for a batch of f16 matrices (s a scale) on cooperative matrices (tensor cores,
// through Vulkan's VK_KHR_cooperative_matrix or Metal's simdgroup matrices), summed in f32:
// A is M x K, B is K x N, both read through strides (a transposed or broadcast operand, or
// attention's heads, need no copy), C is written contiguous, plus the addends D and E where
// given (read through their strides, added in f32 as C is written). Same contract as matmul.wgsl, which
// sums on the ordinary ALUs: burn's best WGSL product reached 6 TFLOP/s on an H200, whose
// tensor cores do ~900 TFLOP/s in f16.
//
// Each workgroup of four subgroups computes a TILE x TILE tile of C; each subgroup one
// quarter of it, FRAGS x FRAGS fragments of FRAG x FRAG held in cooperative matrices. K advances
// DEPTH at a time: the workgroup copies the TILE x DEPTH slice of A and the DEPTH x TILE slice
// of B into workgroup memory (zero outside the matrices, so that any M, N and K work), then
// every subgroup multiplies its fragments from there. At the end each fragment goes through
// workgroup memory to C, where the subgroup's threads write the elements inside the matrix.
//
// DIRECT instead reads each fragment of A and B straight from memory into the cooperative
// matrices, with no copy into workgroup memory and no loads thread by thread (the GPU's
// caches serve the reuse). It needs what those loads need: M, N and K multiples of FRAG, each
// operand contiguous along one of its dimensions, its other strides multiples of 8 (16 bytes)
// and its first element 16-byte aligned (the launching code checks).
//
// Dispatch: (ceil(N / TILE), ceil(M / TILE), batch) workgroups of 4 x SUBGROUP threads, on
// an adapter whose subgroups are all SUBGROUP wide and which multiplies FRAG x FRAG x FRAG
// f16 matrices into f32 (`src/shaders/matmul.rs` checks both).
// Template values: {{ frag }} (16, or 8 where the adapter offers only that, as lavapipe and
// Apple GPUs do), {{ frags }} (fragments per subgroup along each side: TILE / (2 FRAG) for
// tiles of 64 or 128), {{ subgroup }} (the adapter's subgroup size), {{ direct }} (true or
// false).
// (The subgroup builtins need no `enable subgroups;`: naga does not take it yet.)
enable f16;
enable wgpu_cooperative_matrix;

// All read_write: cubecl hands out tensors as ranges of shared buffers, and wgpu refuses a
// buffer bound read-only and writable in one dispatch.
@group(0) @binding(0) var<storage, read_write> a: array<f16>;
@group(0) @binding(1) var<storage, read_write> b: array<f16>;
@group(0) @binding(2) var<storage, read_write> c: array<f16>;
// The addends D and E (C itself where there is none: it is not read then).
@group(0) @binding(3) var<storage, read_write> d: array<f16>;
@group(0) @binding(4) var<storage, read_write> e: array<f16>;
// M, N, K; A's outer batch, row and column strides; B's likewise; the inner batch size;
// A's and B's inner batch strides (elements). Batch item z is (z / inner, z % inner):
// attention's heads are read in place from the [B, S, H, D] projections. Then whether D is
// given (1) or not (0), and its outer batch, inner batch, row and column strides; then E's
// likewise; then the scale s (an f32's bits).
@group(0) @binding(5) var<uniform> info: array<vec4<u32>, 6>;
// The i-th value of `info`: cubecl's info uniform, bound after the buffers, packs them four to a row.
fn word(i: u32) -> u32 { return info[i / 4u][i % 4u]; }

const FRAG: u32 = {{ frag }}u;       // rows and columns of a fragment
const FRAGS: u32 = {{ frags }}u;     // fragments per subgroup along M and along N
const SUBGROUP: u32 = {{ subgroup }}u;
const THREADS: u32 = 4u * SUBGROUP;
const QUARTER: u32 = FRAG * FRAGS;    // rows and columns of C per subgroup
const TILE: u32 = 2u * QUARTER;      // rows and columns of C per workgroup
const DIRECT: bool = {{ direct }};
const DEPTH: u32 = 32u;              // K per step
// Halves per row of the slices in workgroup memory: 8 spare keep the rows 16-byte aligned
// for the cooperative loads and spread them over the banks.
const A_ROW: u32 = DEPTH + 8u;
const B_ROW: u32 = TILE + 8u;

var<workgroup> slice_a: array<f16, TILE * A_ROW>;  // slice_a[i * A_ROW + k] = A[m0 + i, k0 + k]
var<workgroup> slice_b: array<f16, DEPTH * B_ROW>; // slice_b[k * B_ROW + j] = B[k0 + k, n0 + j]
var<workgroup> staged: array<f32, 4u * FRAG * FRAG>; // one fragment of C per subgroup
// Which operands are contiguous along a row (bit 0: A, bit 1: B), for both modes, read
// through workgroupUniformLoad: a cooperative load may only sit behind a branch that is
// provably the same for every thread, which a value read from a storage buffer is not.
var<workgroup> row_major: u32;

// The (row, column) of a `rows` x `cols` slice that a thread copies for its `slot`:
// consecutive threads take consecutive elements along the operand's contiguous dimension, so
// that a subgroup reads a run of memory.
fn cell(slot: u32, rows: u32, cols: u32, along_rows: bool) -> vec2<u32> {
    if (along_rows) {
        return vec2<u32>(slot / cols, slot % cols);
    }
    return vec2<u32>(slot % rows, slot / rows);
}

@compute @workgroup_size(THREADS, 1, 1)
fn main(
    @builtin(workgroup_id) group: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
    @builtin(subgroup_id) subgroup: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let M = word(0);
    let N = word(1);
    let K = word(2);
    let a_row = word(4);
    let a_col = word(5);
    let b_row = word(7);
    let b_col = word(8);
    let m0 = group.y * TILE;
    let n0 = group.x * TILE;
    let outer = group.z / word(9);
    let inner = group.z % word(9);
    let a_base = outer * word(3) + inner * word(10);
    let b_base = outer * word(6) + inner * word(11);
    // This subgroup's quarter of the tile.
    let qm = (subgroup / 2u) * QUARTER;
    let qn = (subgroup % 2u) * QUARTER;

    var sums: array<coop_mat{{ frag }}x{{ frag }}<f32, C>, FRAGS * FRAGS>;

    if (t == 0u) {
        row_major = select(0u, 1u, a_col == 1u) | select(0u, 2u, b_col == 1u);
    }
    let rows_contiguous = workgroupUniformLoad(&row_major);
    // DIRECT: fragments of the quarter outside C read the last one inside instead (the
    // cooperative operations need control flow that is the same for every thread); C never
    // gets them.
    for (var k0 = 0u; DIRECT && k0 < K; k0 += FRAG) {
        var from_b: array<coop_mat{{ frag }}x{{ frag }}<f16, B>, FRAGS>;
        for (var j = 0u; j < FRAGS; j++) {
            let at = b_base + k0 * b_row + min(n0 + qn + FRAG * j, N - FRAG) * b_col;
            if ((rows_contiguous & 2u) != 0u) {
                from_b[j] = coopLoadT<coop_mat{{ frag }}x{{ frag }}<f16, B>>(&b[at], b_row);
            } else {
                from_b[j] = coopLoad<coop_mat{{ frag }}x{{ frag }}<f16, B>>(&b[at], b_col);
            }
        }
        for (var i = 0u; i < FRAGS; i++) {
            let at = a_base + min(m0 + qm + FRAG * i, M - FRAG) * a_row + k0 * a_col;
            var from_a: coop_mat{{ frag }}x{{ frag }}<f16, A>;
            if ((rows_contiguous & 1u) != 0u) {
                from_a = coopLoadT<coop_mat{{ frag }}x{{ frag }}<f16, A>>(&a[at], a_row);
            } else {
                from_a = coopLoad<coop_mat{{ frag }}x{{ frag }}<f16, A>>(&a[at], a_col);
            }
            for (var j = 0u; j < FRAGS; j++) {
                sums[i * FRAGS + j] = coopMultiplyAdd(from_a, from_b[j], sums[i * FRAGS + j]);
            }
        }
    }

    for (var k0 = 0u; !DIRECT && k0 < K; k0 += DEPTH) {
        for (var slot = t; slot < TILE * DEPTH; slot += THREADS) {
            let at = cell(slot, TILE, DEPTH, (rows_contiguous & 1u) != 0u); // (i, k)
            var v = f16(0.0);
            if (m0 + at.x < M && k0 + at.y < K) {
                v = a[a_base + (m0 + at.x) * a_row + (k0 + at.y) * a_col];
            }
            slice_a[at.x * A_ROW + at.y] = v;
        }
        for (var slot = t; slot < DEPTH * TILE; slot += THREADS) {
            let at = cell(slot, DEPTH, TILE, (rows_contiguous & 2u) != 0u); // (k, j)
            var v = f16(0.0);
            if (k0 + at.x < K && n0 + at.y < N) {
                v = b[b_base + (k0 + at.x) * b_row + (n0 + at.y) * b_col];
            }
            slice_b[at.x * B_ROW + at.y] = v;
        }
        workgroupBarrier();

        for (var k = 0u; k < DEPTH; k += FRAG) {
            var from_b: array<coop_mat{{ frag }}x{{ frag }}<f16, B>, FRAGS>;
            for (var j = 0u; j < FRAGS; j++) {
                from_b[j] = coopLoadT<coop_mat{{ frag }}x{{ frag }}<f16, B>>(&slice_b[k * B_ROW + qn + FRAG * j], B_ROW);
            }
            for (var i = 0u; i < FRAGS; i++) {
                let from_a = coopLoadT<coop_mat{{ frag }}x{{ frag }}<f16, A>>(&slice_a[(qm + FRAG * i) * A_ROW + k], A_ROW);
                for (var j = 0u; j < FRAGS; j++) {
                    sums[i * FRAGS + j] = coopMultiplyAdd(from_a, from_b[j], sums[i * FRAGS + j]);
                }
            }
        }
        // Nobody may overwrite the slices before everyone has multiplied them.
        workgroupBarrier();
    }

    let c_base = group.z * M * N;
    let addend = word(12) == 1u;
    let d_base = outer * word(13) + inner * word(14);
    let d_row = word(15);
    let d_col = word(16);
    let second = word(17) == 1u;
    let e_base = outer * word(18) + inner * word(19);
    let e_row = word(20);
    let e_col = word(21);
    let scale = bitcast<f32>(word(22));
    for (var f = 0u; f < FRAGS * FRAGS; f++) {
        let at = subgroup * FRAG * FRAG;
        coopStoreT(sums[f], &staged[at], FRAG);
        workgroupBarrier();
        let m = m0 + qm + FRAG * (f / FRAGS);
        let n = n0 + qn + FRAG * (f % FRAGS);
        for (var x = lane; x < FRAG * FRAG; x += SUBGROUP) {
            let row = m + x / FRAG;
            let col = n + x % FRAG;
            if (row < M && col < N) {
                var v = scale * staged[at + x];
                if (addend) { v += f32(d[d_base + row * d_row + col * d_col]); }
                if (second) { v += f32(e[e_base + row * e_row + col * e_col]); }
                c[c_base + row * N + col] = f16(v);
            }
        }
        workgroupBarrier();
    }
}
