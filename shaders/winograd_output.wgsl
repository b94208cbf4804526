// interface: winograd_output 1 (the bindings and sizes sdw passes; a --shader-dir file must name the same)
// winograd_output: the output transform of Winograd's F(2x2, 3x3) (see winograd_input.wgsl),
// plus the bias. The 16 products m[4k + l, o, t] = Σ_c u[4k + l, o, c] v[4k + l, c, t] of a
// tile t and output channel o, as a 4x4 block M, become its 2x2 output pixels Aᵀ M A, with
//   Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]],
// written into y = [batch, O, rows_out, w_out], the band's output rows; pixels of a tile past
// the output's last row or column are dropped.
//
// One thread per (o, t): neighbouring threads read neighbouring tiles. Arithmetic in f32.
//
// Template values: {{ elem }} (f32 or f16), {{ workgroup }} (threads per workgroup),
// {{ extensions }} (`enable f16;` for f16).
{{ extensions }}

@group(0) @binding(0) var<storage, read_write> m: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> bias: array<{{ elem }}>;
@group(0) @binding(2) var<storage, read_write> y: array<{{ elem }}>;
// batch, channels (O), rows (of tiles), tiles_w, rows_out, w_out
@group(0) @binding(3) var<uniform> info: array<vec4<u32>, 2>;
// The i-th value of `info`: cubecl's info uniform, bound after the buffers, packs them four to a row.
fn word(i: u32) -> u32 { return info[i / 4u][i % 4u]; }

const WORKGROUP: u32 = {{ workgroup }}u;

// Aᵀ applied to the 4 entries of a row or column.
fn apply_at(m: vec4<f32>) -> vec2<f32> {
    return vec2<f32>(m.x + m.y + m.z, m.y - m.z - m.w);
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

    let stride = channels * tiles;
    var mk: array<vec4<f32>, 4>;
    for (var k = 0u; k < 4u; k = k + 1u) {
        let at = (4u * k * channels + o) * tiles + t;
        mk[k] = vec4<f32>(f32(m[at]), f32(m[at + stride]), f32(m[at + 2u * stride]), f32(m[at + 3u * stride]));
    }
    // Aᵀ M, row by row of the result, then each row times A.
    var am = array<vec4<f32>, 2>(mk[0] + mk[1] + mk[2], mk[1] - mk[2] - mk[3]);
    let offset = f32(bias[o]);
    let plane = (b * channels + o) * rows_out;
    for (var a = 0u; a < 2u; a = a + 1u) {
        let row = 2u * r + a;
        let pixels = apply_at(am[a]);
        for (var e = 0u; e < 2u; e = e + 1u) {
            let column = 2u * q + e;
            if (row < rows_out && column < w_out) {
                y[(plane + row) * w_out + column] = {{ elem }}(pixels[e] + offset);
            }
        }
    }
}
