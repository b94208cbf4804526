// interface: im2col 2 (the bindings and sizes sdw passes; a --shader-dir file must name the same)
// im2col: the columns a convolution is multiplied by, for one band of output rows.
// columns[b, (c, i, j), r * W_out + q] = x[b, c, (y0 + r) * sh + i - top, q * sw + j - left],
// zero where that falls in the padding. Replaces padding the input, slicing its kh x kw
// shifted views and stacking them (burn's pad, slice and cat: 11 kernels for a 3x3
// convolution, and a padded copy of the input) with one kernel and no copy.
//
// One thread per (b, c, r, q): it reads the kh x kw taps around its pixel and writes them
// kh x kw rows apart, so neighbouring threads write neighbouring columns.
//
// Template values: {{ elem }} (f32 or f16), {{ workgroup }} (threads per workgroup),
// {{ extensions }} (`enable f16;` for f16).
{{ extensions }}

@group(0) @binding(0) var<storage, read_write> x: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> columns: array<{{ elem }}>;
// batch, channels, height, width, kh, kw, sh, sw, top, left, y0, rows, W_out
@group(0) @binding(2) var<uniform> info: array<vec4<u32>, 4>;
// The i-th value of `info`: cubecl's info uniform, bound after the buffers, packs them four to a row.
fn word(i: u32) -> u32 { return info[i / 4u][i % 4u]; }

const WORKGROUP: u32 = {{ workgroup }}u;

@compute @workgroup_size({{ workgroup }}, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let batch = word(0);
    let channels = word(1);
    let height = word(2);
    let width = word(3);
    let kh = word(4);
    let kw = word(5);
    let sh = word(6);
    let sw = word(7);
    let top = word(8);
    let left = word(9);
    let y0 = word(10);
    let rows = word(11);
    let w_out = word(12);

    // Workgroups beyond 65535 spill over into y.
    let thread = gid.x + gid.y * groups.x * WORKGROUP;
    let pixels = rows * w_out;
    if (thread >= batch * channels * pixels) {
        return;
    }
    let pixel = thread % pixels;
    let plane = thread / pixels; // b * channels + c
    let r = pixel / w_out;
    let q = pixel % w_out;

    // Coordinates in the padded input; the padding is top rows and left columns of zeros.
    let y_first = (y0 + r) * sh;
    let x_first = q * sw;
    let source = plane * height * width;
    // Row (c, i, j) of item b's columns is row plane * kh * kw + i * kw + j overall.
    var index = plane * kh * kw * pixels + pixel;
    for (var i = 0u; i < kh; i = i + 1u) {
        let y = y_first + i;
        let row_inside = y >= top && y - top < height;
        for (var j = 0u; j < kw; j = j + 1u) {
            let xx = x_first + j;
            var value = {{ elem }}(0.0);
            if (row_inside && xx >= left && xx - left < width) {
                value = x[source + (y - top) * width + (xx - left)];
            }
            columns[index] = value;
            index = index + pixels;
        }
    }
}
