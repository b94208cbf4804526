// interface: geglu 2 (the bindings and sizes sdw passes; a --shader-dir file must name the same)
// GEGLU's activation: y[r, j] = h[r, j] * gelu(h[r, F + j]) of a projection h = [rows, 2F]
// holding the value then the gate, with the erf form of GELU (F.gelu). Replaces burn's
// gelu (divide, erf, add, multiply, halve) and the product with the value: one kernel
// and one pass over h instead of six.
//
// One thread per output element; f32 arithmetic for f16 too.
//
// Template values: {{ elem }} (f32 or f16), {{ workgroup }} (threads per workgroup),
// {{ extensions }} (`enable f16;` for f16).
{{ extensions }}

@group(0) @binding(0) var<storage, read_write> h: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> y: array<{{ elem }}>;
// rows, F
@group(0) @binding(2) var<uniform> info: array<vec4<u32>, 1>;
// The i-th value of `info`: cubecl's info uniform, bound after the buffers, packs them four to a row.
fn word(i: u32) -> u32 { return info[i / 4u][i % 4u]; }

const WORKGROUP: u32 = {{ workgroup }}u;

// erf by Abramowitz and Stegun 7.1.26 (largest error 1.5e-7), the approximation burn's erf
// uses, so that the two agree to f32 roundoff.
fn erf(x: f32) -> f32 {
    let a = abs(x);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let poly = ((((1.0614054 * t - 1.453152) * t + 1.4214137) * t - 0.28449674) * t + 0.2548296) * t;
    return sign(x) * (1.0 - poly * exp(-a * a));
}

@compute @workgroup_size({{ workgroup }}, 1, 1)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let rows = word(0);
    let width = word(1);
    // Workgroups beyond 65535 spill over into y.
    let thread = gid.x + gid.y * groups.x * WORKGROUP;
    if (thread >= rows * width) {
        return;
    }
    let r = thread / width;
    let j = thread % width;
    let value = f32(h[r * 2u * width + j]);
    let gate = f32(h[r * 2u * width + width + j]);
    y[thread] = {{ elem }}(value * 0.5 * gate * (1.0 + erf(gate * 0.70710678118654752)));
}
