// interface: winograd_weights 2 (the bindings and sizes sdw passes; a --shader-dir file must name the same)
// winograd_weights: the weight transform of Winograd's F(m x m, 3x3), m = {{ out }} (see
// winograd_input.wgsl): each 3x3 filter g of a [O, C, 3, 3] weight becomes U = G g Gᵀ, with
// G of F(2x2, 3x3) (4 x 3) and of F(4x4, 3x3) (6 x 3) in g_2 and g_4, and
// u[n k + l, o, c] = U[k][l] of filter (o, c), n = m + 2: n² matrices [O, C], one per
// position of an n x n block, which the products multiply the input's transform by. When
// `flipped` (training's input gradient: the weight flipped in both spatial axes, its channel
// axes swapped) the filter's taps are read backwards and U lands at u[n k + l, c, o].
//
// One thread per filter: neighbouring threads read neighbouring filters. Arithmetic in f32.
//
// Template values: {{ elem }} (f32 or f16), {{ out }} (m: 2 or 4), {{ workgroup }} (threads
// per workgroup), {{ extensions }} (`enable f16;` for f16).
{{ extensions }}

@group(0) @binding(0) var<storage, read_write> w: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> u: array<{{ elem }}>;
// filters (O * C), C, flipped (0 or 1)
@group(0) @binding(2) var<uniform> info: array<vec4<u32>, 1>;
// The i-th value of `info`: cubecl's info uniform, bound after the buffers, packs them four to a row.
fn word(i: u32) -> u32 { return info[i / 4u][i % 4u]; }

const WORKGROUP: u32 = {{ workgroup }}u;
const OUT: u32 = {{ out }}u; // output pixels per tile side
const IN: u32 = OUT + 2u;    // input pixels per tile side

// G of F(2x2, 3x3) applied to 3 taps: [[1, 0, 0], [½, ½, ½], [½, -½, ½], [0, 0, 1]].
fn g_2(g: vec3<f32>) -> array<f32, 4> {
    return array<f32, 4>(g.x, (g.x + g.y + g.z) * 0.5, (g.x - g.y + g.z) * 0.5, g.z);
}

// G of F(4x4, 3x3) applied to 3 taps: [[1, 0, 0], [-⅓, ⅓, -⅓], [⅓, ⅓, ⅓],
// [-16/15, -8/15, -4/15], [1/15, -2/15, 4/15], [0, 0, 1]] (see winograd_input.wgsl's bt_4).
fn g_4(g: vec3<f32>) -> array<f32, 6> {
    return array<f32, 6>(
        g.x, (g.y - g.x - g.z) * (1.0 / 3.0), (g.x + g.y + g.z) * (1.0 / 3.0),
        -(16.0 * g.x + 8.0 * g.y + 4.0 * g.z) * (1.0 / 15.0), (g.x - 2.0 * g.y + 4.0 * g.z) * (1.0 / 15.0), g.z,
    );
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
    // G g column by column (G applied to each column of taps), then each row of it times Gᵀ.
    // `g_{{ out }}` is g_2 or g_4.
    var columns = array<array<f32, IN>, 3>(
        g_{{ out }}(vec3<f32>(taps[0], taps[3], taps[6])),
        g_{{ out }}(vec3<f32>(taps[1], taps[4], taps[7])),
        g_{{ out }}(vec3<f32>(taps[2], taps[5], taps[8])),
    );
    var index = first;
    for (var k = 0u; k < IN; k = k + 1u) {
        var row = g_{{ out }}(vec3<f32>(columns[0][k], columns[1][k], columns[2][k]));
        for (var l = 0u; l < IN; l = l + 1u) {
            u[index] = {{ elem }}(row[l]);
            index = index + filters;
        }
    }
}
