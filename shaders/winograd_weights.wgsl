// interface: winograd_weights 1 (the bindings and sizes sdw passes; a --shader-dir file must name the same)
// winograd_weights: the weight transform of Winograd's F(2x2, 3x3) (see winograd_input.wgsl):
// each 3x3 filter g of a [O, C, 3, 3] weight becomes U = G g Gᵀ, with
//   G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]],
// and u[4k + l, o, c] = U[k][l] of filter (o, c): 16 matrices [O, C], one per position of a
// 4x4 block, which the products multiply the input's transform by. When `flipped` (training's
// input gradient: the weight flipped in both spatial axes, its channel axes swapped) the
// filter's taps are read backwards and U lands at u[4k + l, c, o].
//
// One thread per filter: neighbouring threads read neighbouring filters. Arithmetic in f32.
//
// Template values: {{ elem }} (f32 or f16), {{ workgroup }} (threads per workgroup),
// {{ extensions }} (`enable f16;` for f16).
{{ extensions }}

@group(0) @binding(0) var<storage, read_write> w: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> u: array<{{ elem }}>;
// filters (O * C), C, flipped (0 or 1)
@group(0) @binding(2) var<uniform> info: array<vec4<u32>, 1>;
// The i-th value of `info`: cubecl's info uniform, bound after the buffers, packs them four to a row.
fn word(i: u32) -> u32 { return info[i / 4u][i % 4u]; }

const WORKGROUP: u32 = {{ workgroup }}u;

// G applied to the 3 taps of a row or column.
fn apply_g(g: vec3<f32>) -> vec4<f32> {
    return vec4<f32>(g.x, (g.x + g.y + g.z) * 0.5, (g.x - g.y + g.z) * 0.5, g.z);
}

@compute @workgroup_size({{ workgroup }}, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let filters = word(0);
    let cin = word(1);
    let flipped = word(2) == 1u;
    // Workgroups beyond 65535 spill over into y.
    let thread = gid.x + gid.y * groups.x * WORKGROUP;
    if (thread >= filters) {
        return;
    }
    // Filter (o, c); flipped, its taps are read backwards and it lands at (c, o).
    let o = thread / cin;
    let c = thread % cin;
    let first = select(thread, c * (filters / cin) + o, flipped);
    var taps: array<f32, 9>;
    for (var tap = 0u; tap < 9u; tap = tap + 1u) {
        taps[tap] = f32(w[thread * 9u + select(tap, 8u - tap, flipped)]);
    }
    var g: array<vec3<f32>, 3>;
    for (var i = 0u; i < 3u; i = i + 1u) {
        g[i] = vec3<f32>(taps[3u * i], taps[3u * i + 1u], taps[3u * i + 2u]);
    }
    // G g, row by row of the result, then each row times Gᵀ.
    var gg = array<vec3<f32>, 4>(g[0], (g[0] + g[1] + g[2]) * 0.5, (g[0] - g[1] + g[2]) * 0.5, g[2]);
    var index = first;
    for (var k = 0u; k < 4u; k = k + 1u) {
        let row = apply_g(gg[k]);
        for (var l = 0u; l < 4u; l = l + 1u) {
            u[index] = {{ elem }}(row[l]);
            index = index + filters;
        }
    }
}
