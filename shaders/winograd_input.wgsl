// interface: winograd_input 3 (the bindings and sizes sdw passes; a --shader-dir file must name the same)
// winograd_input: the input transform of Winograd's F(m x m, 3x3) (Lavin & Gray, 2015),
// m = {{ out }}, for a 3x3 convolution at stride 1, over one band of tile rows. A tile is an
// m x m block of output pixels; the n x n block of input under it (n = m + 2), d, becomes
// V = Bᵀ d B, with Bᵀ of F(2x2, 3x3) and of F(4x4, 3x3) in bt_2 and bt_4, and
// v[n k + l, c, t] = V[k][l] of channel c under tile t = (b * rows + r) * tiles_w + q
// (tile row ty0 + r and column q of item b). d is zero in the padding and past the input.
// What d holds of x may first go through what the layer before the convolution would have
// written, so that its output is never stored: a nearest-neighbour 2x upsampling (x is read
// at half the size; an upsampler's convolution), then a GroupNorm as the affine map of its
// channel (`affine`: a, s per (item, channel) from group_norm.wgsl) and SiLU (a ResNet's
// convolutions).
// With winograd_weights.wgsl and winograd_output.wgsl it replaces im2col.wgsl and the product
// over its columns (9x the input) by n² products over V: F(2x2, 3x3) does 4/9 of the
// multiplications over 4x the input, F(4x4, 3x3) 1/4 of them over 2.25x the input.
//
// One thread per (c, t): neighbouring threads write neighbouring tiles. Arithmetic in f32.
//
// Template values: {{ elem }} (f32 or f16), {{ out }} (m: 2 or 4), {{ workgroup }} (threads
// per workgroup), {{ extensions }} (`enable f16;` for f16).
{{ extensions }}

@group(0) @binding(0) var<storage, read_write> x: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> affine: array<f32>;
@group(0) @binding(2) var<storage, read_write> v: array<{{ elem }}>;
// batch, channels, height, width (the convolution's input: twice x's when upsampling), top,
// left, ty0, rows, tiles_w, upsample (0/1), normalize (0/1: the affine map, then SiLU)
@group(0) @binding(3) var<uniform> info: array<vec4<u32>, 3>;
// The i-th value of `info`: cubecl's info uniform, bound after the buffers, packs them four to a row.
fn word(i: u32) -> u32 { return info[i / 4u][i % 4u]; }

const WORKGROUP: u32 = {{ workgroup }}u;
const OUT: u32 = {{ out }}u; // output pixels per tile side
const IN: u32 = OUT + 2u;    // input pixels per tile side

// Bᵀ of F(2x2, 3x3) applied to 4 values: [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0],
// [0, 1, 0, -1]].
fn bt_2(d: array<f32, 4>) -> array<f32, 4> {
    return array<f32, 4>(d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]);
}

// Bᵀ of F(4x4, 3x3) applied to 6 values: [[1, -3/2, -2, 3/2, 1, 0], [0, 1, -5/2, ½, 1, 0],
// [0, -1, ½, 5/2, 1, 0], [0, -2, -1, 2, 1, 0], [0, ½, -1, -½, 1, 0], [0, 1, -3/2, -2, 3/2, 1]]:
// Toom-Cook at the points 0, -1, 1, ½, -2 and ∞, whose f32 error is 2-4x smaller than at
// Lavin & Gray's 0, ±1, ±2 and ∞ (Barabasz et al., 2020).
fn bt_4(d: array<f32, 6>) -> array<f32, 6> {
    return array<f32, 6>(
        d[0] - 1.5 * d[1] - 2.0 * d[2] + 1.5 * d[3] + d[4],
        d[1] - 2.5 * d[2] + 0.5 * d[3] + d[4],
        0.5 * d[2] - d[1] + 2.5 * d[3] + d[4],
        2.0 * (d[3] - d[1]) - d[2] + d[4],
        0.5 * (d[1] - d[3]) - d[2] + d[4],
        d[1] - 1.5 * d[2] - 2.0 * d[3] + 1.5 * d[4] + d[5],
    );
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
    let upsample = word(9);
    let normalize = word(10) != 0u;

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

    // The n x n block in padded coordinates, column by column: rows m (ty0 + r) + i, columns
    // m q + j; the padding is `top` rows and `left` columns of zeros.
    // x's plane of channel c, and its own width (half the input's when upsampling).
    let x_width = width >> upsample;
    let plane = (b * channels + c) * (height >> upsample) * x_width;
    var scale = 0.0;
    var shift = 0.0;
    if (normalize) {
        scale = affine[2u * (b * channels + c)];
        shift = affine[2u * (b * channels + c) + 1u];
    }
    let y_first = OUT * (ty0 + r);
    let x_first = OUT * q;
    var d: array<array<f32, IN>, IN>;
    for (var j = 0u; j < IN; j = j + 1u) {
        let xx = x_first + j;
        for (var i = 0u; i < IN; i = i + 1u) {
            let y = y_first + i;
            var value = 0.0;
            if (y >= top && y - top < height && xx >= left && xx - left < width) {
                value = f32(x[plane + ((y - top) >> upsample) * x_width + ((xx - left) >> upsample)]);
                if (normalize) {
                    value = value * scale + shift;
                    value = value / (1.0 + exp(-value));
                }
            }
            d[j][i] = value;
        }
    }
    // Bᵀ d column by column, then each of its rows times B. `bt_{{ out }}` is bt_2 or bt_4.
    var bd: array<array<f32, IN>, IN>;
    for (var j = 0u; j < IN; j = j + 1u) {
        var column = bt_{{ out }}(d[j]);
        for (var k = 0u; k < IN; k = k + 1u) {
            bd[k][j] = column[k];
        }
    }
    let stride = channels * tiles;
    var index = c * tiles + t;
    for (var k = 0u; k < IN; k = k + 1u) {
        var row = bt_{{ out }}(bd[k]);
        for (var l = 0u; l < IN; l = l + 1u) {
            v[index] = {{ elem }}(row[l]);
            index = index + stride;
        }
    }
}
