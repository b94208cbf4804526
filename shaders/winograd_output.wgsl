// interface: winograd_output 4 (the bindings and sizes sdw passes; a --shader-dir file must name the same)
// winograd_output: the output transform of Winograd's F(m x m, 3x3), m = {{ out }} (see
// winograd_input.wgsl), plus the bias and an addend where given (a residual, or a term per
// channel: read through its strides, with stride 0 along broadcast dims). The n² products m[n k + l, o, t] =
// Σ_c u[n k + l, o, c] v[n k + l, c, t] of a tile t and output channel o (n = m + 2), as an
// n x n block M, become its m x m output pixels Aᵀ M A, with Aᵀ of F(2x2, 3x3) and of
// F(4x4, 3x3) in at_2 and at_4, written into the band's rows of y = [batch, O, height, w_out],
// the whole output (each band writes its own rows: no band is copied into place after);
// pixels of a tile past the output's last row or column are dropped.
//
// One thread per (o, t): neighbouring threads read neighbouring tiles. Arithmetic in f32.
//
// Template values: {{ elem }} (f32 or f16), {{ out }} (m: 2 or 4), {{ workgroup }} (threads
// per workgroup), {{ extensions }} (`enable f16;` for f16).
{{ extensions }}

@group(0) @binding(0) var<storage, read_write> m: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> bias: array<{{ elem }}>;
@group(0) @binding(2) var<storage, read_write> y: array<{{ elem }}>;
// The addend (y itself where there is none: it is not read then).
@group(0) @binding(3) var<storage, read_write> addend: array<{{ elem }}>;
// batch, channels (O), rows (of tiles), tiles_w, rows_out (the band's output rows), w_out,
// the band's first row in the whole output, whether the addend is given (1) or not (0), and
// its batch, channel, row and column strides over the whole output; the whole output's height.
@group(0) @binding(4) var<uniform> info: array<vec4<u32>, 4>;
// The i-th value of `info`: cubecl's info uniform, bound after the buffers, packs them four to a row.
fn word(i: u32) -> u32 { return info[i / 4u][i % 4u]; }

const WORKGROUP: u32 = {{ workgroup }}u;
const OUT: u32 = {{ out }}u; // output pixels per tile side
const IN: u32 = OUT + 2u;    // input pixels per tile side

// Aᵀ of F(2x2, 3x3) applied to 4 sums: [[1, 1, 1, 0], [0, 1, -1, -1]].
fn at_2(m: array<f32, 4>) -> array<f32, 2> {
    return array<f32, 2>(m[0] + m[1] + m[2], m[1] - m[2] - m[3]);
}

// Aᵀ of F(4x4, 3x3) applied to 6 sums: [[1, 1, 1, 1, 1, 0], [0, -1, 1, ½, -2, 0],
// [0, 1, 1, ¼, 4, 0], [0, -1, 1, ⅛, -8, 1]] (see winograd_input.wgsl's bt_4).
fn at_4(m: array<f32, 6>) -> array<f32, 4> {
    let near = m[2] + m[1];
    let near_odd = m[2] - m[1];
    return array<f32, 4>(
        near + m[0] + m[3] + m[4],
        near_odd + 0.5 * m[3] - 2.0 * m[4],
        near + 0.25 * m[3] + 4.0 * m[4],
        near_odd + 0.125 * m[3] - 8.0 * m[4] + m[5],
    );
}

@compute @workgroup_size({{ workgroup }}, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let batch = word(0);
    let channels = word(1);
    let rows = word(2);
    let tiles_w = word(3);
    let rows_out = word(4);
    let w_out = word(5);

    // Workgroups beyond 65535 spill over into y.
    let thread = gid.x + gid.y * groups.x * WORKGROUP;
    let tiles = batch * rows * tiles_w;
    if (thread >= channels * tiles) {
        return;
    }
    let o = thread / tiles;
    let t = thread % tiles;
    let q = t % tiles_w;
    let r = (t / tiles_w) % rows;
    let b = t / (tiles_w * rows);

    // M column by column.
    let stride = channels * tiles;
    var mk: array<array<f32, IN>, IN>;
    for (var l = 0u; l < IN; l = l + 1u) {
        for (var k = 0u; k < IN; k = k + 1u) {
            mk[l][k] = f32(m[(IN * k + l) * stride + o * tiles + t]);
        }
    }
    // Aᵀ M column by column, then each of its rows times A. `at_{{ out }}` is at_2 or at_4.
    var am: array<array<f32, IN>, OUT>;
    for (var l = 0u; l < IN; l = l + 1u) {
        var column = at_{{ out }}(mk[l]);
        for (var a = 0u; a < OUT; a = a + 1u) {
            am[a][l] = column[a];
        }
    }
    let offset = f32(bias[o]);
    let first = word(6);
    let plane = (b * channels + o) * word(12) + first;
    let given = word(7) == 1u;
    let addend_plane = b * word(8) + o * word(9);
    for (var a = 0u; a < OUT; a = a + 1u) {
        let row = OUT * r + a;
        var pixels = at_{{ out }}(am[a]);
        for (var e = 0u; e < OUT; e = e + 1u) {
            let column = OUT * q + e;
            if (row < rows_out && column < w_out) {
                var extra = 0.0;
                if (given) {
                    extra = f32(addend[addend_plane + (first + row) * word(10) + column * word(11)]);
                }
                y[(plane + row) * w_out + column] = {{ elem }}(pixels[e] + offset + extra);
            }
        }
    }
}
