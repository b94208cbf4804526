// interface: matmul 6 (the bindings and sizes sdw passes; a --shader-dir file must name the same)
// Matrix product C = s A B (+ D (+ E)) for a batch of matrices, summed in f32, where s is a
// scale (attention's 1/√d on its scores, 1 elsewhere): A is M x K, B is K x N, both read through strides (a transposed or broadcast operand, or attention's heads,
// need no copy), C is written contiguous. D and E, where given, are added as C is written:
// a bias, a residual, a LoRA's base output, each read through its strides (a bias is
// broadcast over the rows or the columns with stride 0), so the sums cost no kernel and no
// pass over C of their own. Replaces burn's matmul where the shader compiler
// offers no cooperative matrices (WGSL): burn's best kernel there reached 6 TFLOP/s on an
// H200, a tenth of the card's f32 rate.
//
// The classic register-tiled product: each workgroup of 16 x 16 threads computes a
// TILE x TILE tile of C. At TILE 128 each thread computes an 8 x 8 block of it (four
// 4 x 4 quarters, 64 rows and columns apart, so that the threads of a warp read
// consecutive vec4s of workgroup memory); at TILE 64, for products too small to give every
// core a 128 x 128 tile, a 4 x 4 block. K advances 16 at a time: the next TILE x 16 slice
// of A and 16 x TILE slice of B are read into registers while the current ones, in
// workgroup memory, are multiplied. Workgroup memory holds both slices as vec4s along M
// and N, whatever the layout of A and B in memory; each thread reads them from A and B
// along the operand's contiguous dimension, so that a warp reads whole runs of memory.
//
// Dispatch: (ceil(N / TILE), ceil(M / TILE), batch) workgroups of 256 threads.
// Template values: {{ elem }} (f32 or f16), {{ tile }} (128 or 64), {{ extensions }}
// (`enable f16;` for f16).
{{ extensions }}

// All read_write: cubecl hands out tensors as ranges of shared buffers, and wgpu refuses a
// buffer bound read-only and writable in one dispatch.
@group(0) @binding(0) var<storage, read_write> a: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> b: array<{{ elem }}>;
@group(0) @binding(2) var<storage, read_write> c: array<{{ elem }}>;
// The addends D and E (C itself where there is none: it is not read then).
@group(0) @binding(3) var<storage, read_write> d: array<{{ elem }}>;
@group(0) @binding(4) var<storage, read_write> e: array<{{ elem }}>;
// M, N, K; A's outer batch, row and column strides; B's likewise; the inner batch size;
// A's and B's inner batch strides (elements). Batch item z is (z / inner, z % inner):
// attention's heads are read in place from the [B, S, H, D] projections. Then whether D is
// given (1) or not (0), and its outer batch, inner batch, row and column strides; then E's
// likewise; then the scale s (an f32's bits).
@group(0) @binding(5) var<uniform> info: array<vec4<u32>, 6>;
// The i-th value of `info`: cubecl's info uniform, bound after the buffers, packs them four to a row.
fn word(i: u32) -> u32 { return info[i / 4u][i % 4u]; }

const TILE: u32 = {{ tile }}u;  // rows and columns of C per workgroup
const WIDE: bool = TILE == 128u; // 8 x 8 per thread (else 4 x 4)
const DEPTH: u32 = 16u;          // K per step
const LANES: u32 = TILE / 4u;    // vec4s across a tile
const ROW: u32 = LANES + 1u;     // vec4s per row of workgroup memory: one spare keeps
                                 // stores along K off a single bank
const THREADS: u32 = 256u;

// tile_a[k * ROW + i] = A[m0 + 4i .. m0 + 4i + 3, k0 + k]; tile_b[k * ROW + i] likewise
// holds B[k0 + k, n0 + 4i .. n0 + 4i + 3].
var<workgroup> tile_a: array<vec4<f32>, DEPTH * ROW>;
var<workgroup> tile_b: array<vec4<f32>, DEPTH * ROW>;

var<private> M: u32;
var<private> N: u32;
var<private> K: u32;
var<private> A_ROW: u32;
var<private> A_COL: u32;
var<private> B_ROW: u32;
var<private> B_COL: u32;
var<private> ADDEND: bool;
var<private> D_ROW: u32;
var<private> D_COL: u32;
var<private> SECOND: bool;
var<private> E_ROW: u32;
var<private> E_COL: u32;
var<private> SCALE: f32;

// A[m .. m + 3, k] from the batch item at `base`, zero outside the matrix.
fn read_a(base: u32, m: u32, k: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (k < K) {
        let at = base + m * A_ROW + k * A_COL;
        if (m < M) { v.x = f32(a[at]); }
        if (m + 1u < M) { v.y = f32(a[at + A_ROW]); }
        if (m + 2u < M) { v.z = f32(a[at + 2u * A_ROW]); }
        if (m + 3u < M) { v.w = f32(a[at + 3u * A_ROW]); }
    }
    return v;
}

// B[k, n .. n + 3] from the batch item at `base`, zero outside the matrix: read_a's twin
// (a WGSL function cannot take the storage buffer to read as an argument).
fn read_b(base: u32, k: u32, n: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (k < K) {
        let at = base + k * B_ROW + n * B_COL;
        if (n < N) { v.x = f32(b[at]); }
        if (n + 1u < N) { v.y = f32(b[at + B_COL]); }
        if (n + 2u < N) { v.z = f32(b[at + 2u * B_COL]); }
        if (n + 3u < N) { v.w = f32(b[at + 3u * B_COL]); }
    }
    return v;
}

// Which (k, lane) of a slice a thread reads for its `slot` (0 .. DEPTH * LANES): consecutive threads
// take consecutive k where the operand is contiguous along K, consecutive lanes otherwise.
fn place(slot: u32, k_contiguous: bool) -> vec2<u32> {
    if (k_contiguous) {
        return vec2<u32>(slot % DEPTH, slot / DEPTH);
    }
    return vec2<u32>(slot / LANES, slot % LANES);
}

// D[m, n .. n + 3] from the batch item at `base`, zero where there is no D: read_b's twin.
fn read_d(base: u32, m: u32, n: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (ADDEND) {
        let at = base + m * D_ROW + n * D_COL;
        if (n < N) { v.x = f32(d[at]); }
        if (n + 1u < N) { v.y = f32(d[at + D_COL]); }
        if (n + 2u < N) { v.z = f32(d[at + 2u * D_COL]); }
        if (n + 3u < N) { v.w = f32(d[at + 3u * D_COL]); }
    }
    return v;
}

// E[m, n .. n + 3] from the batch item at `base`, zero where there is no E: read_d's twin.
fn read_e(base: u32, m: u32, n: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (SECOND) {
        let at = base + m * E_ROW + n * E_COL;
        if (n < N) { v.x = f32(e[at]); }
        if (n + 1u < N) { v.y = f32(e[at + E_COL]); }
        if (n + 2u < N) { v.z = f32(e[at + 2u * E_COL]); }
        if (n + 3u < N) { v.w = f32(e[at + 3u * E_COL]); }
    }
    return v;
}

// C[m, n .. n + 3] = s v + D[m, n .. n + 3] + E[m, n .. n + 3], where inside the matrix; the
// bases are the batch item's in C, D and E.
fn write_c(base: vec3<u32>, m: u32, n: u32, sum: vec4<f32>) {
    if (m < M) {
        let v = SCALE * sum + read_d(base.y, m, n) + read_e(base.z, m, n);
        let at = base.x + m * N + n;
        if (n < N) { c[at] = {{ elem }}(v.x); }
        if (n + 1u < N) { c[at + 1u] = {{ elem }}(v.y); }
        if (n + 2u < N) { c[at + 2u] = {{ elem }}(v.z); }
        if (n + 3u < N) { c[at + 3u] = {{ elem }}(v.w); }
    }
}

@compute @workgroup_size(256, 1, 1)
fn main(@builtin(workgroup_id) group: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    M = word(0);
    N = word(1);
    K = word(2);
    A_ROW = word(4);
    A_COL = word(5);
    B_ROW = word(7);
    B_COL = word(8);
    ADDEND = word(12) == 1u;
    D_ROW = word(15);
    D_COL = word(16);
    SECOND = word(17) == 1u;
    E_ROW = word(20);
    E_COL = word(21);
    SCALE = bitcast<f32>(word(22));
    let m0 = group.y * TILE;
    let n0 = group.x * TILE;
    let outer = group.z / word(9);
    let inner = group.z % word(9);
    let a_base = outer * word(3) + inner * word(10);
    let b_base = outer * word(6) + inner * word(11);
    let d_base = outer * word(13) + inner * word(14);
    let e_base = outer * word(18) + inner * word(19);

    // This thread's slots of each slice: two at TILE 128, one at 64 (the second unused).
    let pa0 = place(t, A_COL == 1u);
    let pa1 = place(t + THREADS, A_COL == 1u);
    let pb0 = place(t, B_ROW == 1u);
    let pb1 = place(t + THREADS, B_ROW == 1u);

    var next_a0 = read_a(a_base, m0 + 4u * pa0.y, pa0.x);
    var next_b0 = read_b(b_base, pb0.x, n0 + 4u * pb0.y);
    var next_a1 = vec4<f32>(0.0);
    var next_b1 = vec4<f32>(0.0);
    if (WIDE) {
        next_a1 = read_a(a_base, m0 + 4u * pa1.y, pa1.x);
        next_b1 = read_b(b_base, pb1.x, n0 + 4u * pb1.y);
    }

    // The block: row r of quarter (i, j) is c{r}{j}, for rows 4 * ty + r (i = 0, r < 4) and
    // 64 + 4 * ty + r - 4 (i = 1), columns 4 * tx (j = 0) and 64 + 4 * tx (j = 1). At
    // TILE 64 only quarter (0, 0).
    let tx = t % 16u;
    let ty = t / 16u;
    var c00 = vec4<f32>(0.0); var c01 = vec4<f32>(0.0);
    var c10 = vec4<f32>(0.0); var c11 = vec4<f32>(0.0);
    var c20 = vec4<f32>(0.0); var c21 = vec4<f32>(0.0);
    var c30 = vec4<f32>(0.0); var c31 = vec4<f32>(0.0);
    var c40 = vec4<f32>(0.0); var c41 = vec4<f32>(0.0);
    var c50 = vec4<f32>(0.0); var c51 = vec4<f32>(0.0);
    var c60 = vec4<f32>(0.0); var c61 = vec4<f32>(0.0);
    var c70 = vec4<f32>(0.0); var c71 = vec4<f32>(0.0);

    for (var k0 = 0u; k0 < K; k0 = k0 + DEPTH) {
        // Nobody may overwrite the slices before everyone has multiplied them.
        workgroupBarrier();
        tile_a[pa0.x * ROW + pa0.y] = next_a0;
        tile_b[pb0.x * ROW + pb0.y] = next_b0;
        if (WIDE) {
            tile_a[pa1.x * ROW + pa1.y] = next_a1;
            tile_b[pb1.x * ROW + pb1.y] = next_b1;
        }
        workgroupBarrier();

        // The next slices' reads are in flight while this one is multiplied.
        let k1 = k0 + DEPTH;
        if (k1 < K) {
            next_a0 = read_a(a_base, m0 + 4u * pa0.y, k1 + pa0.x);
            next_b0 = read_b(b_base, k1 + pb0.x, n0 + 4u * pb0.y);
            if (WIDE) {
                next_a1 = read_a(a_base, m0 + 4u * pa1.y, k1 + pa1.x);
                next_b1 = read_b(b_base, k1 + pb1.x, n0 + 4u * pb1.y);
            }
        }

        for (var k = 0u; k < DEPTH; k = k + 1u) {
            let a0 = tile_a[k * ROW + ty];
            let b0 = tile_b[k * ROW + tx];
            c00 += a0.x * b0;
            c10 += a0.y * b0;
            c20 += a0.z * b0;
            c30 += a0.w * b0;
            if (WIDE) {
                let a1 = tile_a[k * ROW + 16u + ty];
                let b1 = tile_b[k * ROW + 16u + tx];
                c01 += a0.x * b1;
                c11 += a0.y * b1;
                c21 += a0.z * b1;
                c31 += a0.w * b1;
                c40 += a1.x * b0; c41 += a1.x * b1;
                c50 += a1.y * b0; c51 += a1.y * b1;
                c60 += a1.z * b0; c61 += a1.z * b1;
                c70 += a1.w * b0; c71 += a1.w * b1;
            }
        }
    }

    let base = vec3<u32>(group.z * M * N, d_base, e_base);
    let m = m0 + 4u * ty;
    let n = n0 + 4u * tx;
    write_c(base, m, n, c00);
    write_c(base, m + 1u, n, c10);
    write_c(base, m + 2u, n, c20);
    write_c(base, m + 3u, n, c30);
    if (WIDE) {
        write_c(base, m, n + 64u, c01);
        write_c(base, m + 1u, n + 64u, c11);
        write_c(base, m + 2u, n + 64u, c21);
        write_c(base, m + 3u, n + 64u, c31);
        write_c(base, m + 64u, n, c40); write_c(base, m + 64u, n + 64u, c41);
        write_c(base, m + 65u, n, c50); write_c(base, m + 65u, n + 64u, c51);
        write_c(base, m + 66u, n, c60); write_c(base, m + 66u, n + 64u, c61);
        write_c(base, m + 67u, n, c70); write_c(base, m + 67u, n + 64u, c71);
    }
}
