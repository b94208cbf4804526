// interface: winograd_input 1 (the bindings and sizes sdw passes; a --shader-dir file must name the same)
// winograd_input: the input transform of Winograd's F(2x2, 3x3) (Lavin & Gray, 2015) for a
// 3x3 convolution at stride 1, over one band of tile rows. A tile is a 2x2 block of output
// pixels; the 4x4 block of input under it, d, becomes V = Bᵀ d B, with
//   Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
// and v[4k + l, c, t] = V[k][l] of channel c under tile t = (b * rows + r) * tiles_w + q
// (tile row ty0 + r and column q of item b). d is zero in the padding and past the input.
// With winograd_weights.wgsl and winograd_output.wgsl it replaces im2col.wgsl and the product
// over its columns (9x the input) by 16 products over V (4x the input), with 2.25x fewer
// multiplications.
//
// One thread per (c, t): neighbouring threads write neighbouring tiles. Arithmetic in f32.
//
// Template values: {{ elem }} (f32 or f16), {{ workgroup }} (threads per workgroup),
// {{ extensions }} (`enable f16;` for f16).
{{ extensions }}

@group(0) @binding(0) var<storage, read_write> x: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> v: array<{{ elem }}>;
// batch, channels, height, width, top, left, ty0, rows, tiles_w
@group(0) @binding(2) var<uniform> info: array<vec4<u32>, 3>;
// The i-th value of `info`: cubecl's info uniform, bound after the buffers, packs them four to a row.
fn word(i: u32) -> u32 { return info[i / 4u][i % 4u]; }

const WORKGROUP: u32 = {{ workgroup }}u;

// Bᵀ applied to the 4 entries of a row or column.
fn apply_bt(d: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(d.x - d.z, d.y + d.z, d.z - d.y, d.y - d.w);
}

@compute @workgroup_size({{ workgroup }}, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let batch = word(0);
    let channels = word(1);
    let height = word(2);
    let width = word(3);
    let top = word(4);
    let left = word(5);
    let ty0 = word(6);
    let rows = word(7);
    let tiles_w = word(8);

    // Workgroups beyond 65535 spill over into y.
    let thread = gid.x + gid.y * groups.x * WORKGROUP;
    let tiles = batch * rows * tiles_w;
    if (thread >= channels * tiles) {
        return;
    }
    let c = thread / tiles;
    let t = thread % tiles;
    let q = t % tiles_w;
    let r = (t / tiles_w) % rows;
    let b = t / (tiles_w * rows);

    // The 4x4 block in padded coordinates: rows 2 (ty0 + r) + i, columns 2q + j; the padding
    // is `top` rows and `left` columns of zeros.
    let plane = (b * channels + c) * height * width;
    let y_first = 2u * (ty0 + r);
    let x_first = 2u * q;
    var d: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i = i + 1u) {
        let y = y_first + i;
        var row = vec4<f32>(0.0);
        if (y >= top && y - top < height) {
            for (var j = 0u; j < 4u; j = j + 1u) {
                let xx = x_first + j;
                if (xx >= left && xx - left < width) {
                    row[j] = f32(x[plane + (y - top) * width + (xx - left)]);
                }
            }
        }
        d[i] = row;
    }
    // Bᵀ d, row by row of the result, then each row times B.
    var bd = array<vec4<f32>, 4>(d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]);
    let stride = channels * tiles;
    var index = c * tiles + t;
    for (var k = 0u; k < 4u; k = k + 1u) {
        let row = apply_bt(bd[k]);
        for (var l = 0u; l < 4u; l = l + 1u) {
            v[index] = {{ elem }}(row[l]);
            index = index + stride;
        }
    }
}
