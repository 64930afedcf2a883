/*
 * Compiled twin of kmsd.protocol.crypto.PyRijndael (PROTOCOL.md §4.4, §4.5).
 *
 * Rijndael with a 128-bit block over an already expanded key schedule: the key expansion
 * and the V6 round-key tweak stay in Python (crypto.expand_key), so they are defined once.
 * The schedule arrives as 16 * (Nr + 1) bytes, each 32-bit word big-endian (FIPS-197 byte
 * order). The cipher is the usual four-table formulation; the tables are computed at
 * module initialisation from the S-box, which itself is computed from GF(2^8) arithmetic.
 *
 * The keys this serves (K4, K6) are public constants of the protocol, so table lookups
 * indexed by secret data are not a concern here.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define BLOCK 16
#define MIN_ROUNDS 1
#define MAX_ROUNDS 14
#define MAX_WORDS (4 * (MAX_ROUNDS + 1))

static uint8_t sbox[256];
static uint8_t inv_sbox[256];
static uint32_t te[4][256]; /* SubBytes + ShiftRows column + MixColumns */
static uint32_t td[4][256]; /* InvSubBytes + InvMixColumns */
static int tables_ready = 0;

static uint8_t
xtime(uint8_t x)
{
    return (uint8_t)((x << 1) ^ ((x & 0x80) ? 0x1B : 0x00));
}

static uint8_t
gf_mul(uint8_t a, uint8_t b)
{
    uint8_t product = 0;
    while (b) {
        if (b & 1) {
            product ^= a;
        }
        a = xtime(a);
        b >>= 1;
    }
    return product;
}

static uint8_t
rotl8(uint8_t x, int n)
{
    return (uint8_t)((x << n) | (x >> (8 - n)));
}

static uint32_t
ror32_8(uint32_t w)
{
    return (w >> 8) | (w << 24);
}

static uint32_t
column(uint8_t a, uint8_t b, uint8_t c, uint8_t d)
{
    return ((uint32_t)a << 24) | ((uint32_t)b << 16) | ((uint32_t)c << 8) | (uint32_t)d;
}

static void
build_tables(void)
{
    uint8_t power[255];
    uint8_t logarithm[256] = {0};
    uint8_t x = 1;
    int i, v;

    if (tables_ready) {
        return;
    }
    /* 3 generates the multiplicative group of GF(2^8): power[i] = 3^i. */
    for (i = 0; i < 255; i++) {
        power[i] = x;
        logarithm[x] = (uint8_t)i;
        x ^= xtime(x);
    }
    for (v = 0; v < 256; v++) {
        uint8_t inverse = v ? power[(255 - logarithm[v]) % 255] : 0;
        uint8_t s = inverse ^ rotl8(inverse, 1) ^ rotl8(inverse, 2) ^ rotl8(inverse, 3) ^
                    rotl8(inverse, 4) ^ 0x63;
        sbox[v] = s;
        inv_sbox[s] = (uint8_t)v;
    }
    for (v = 0; v < 256; v++) {
        uint8_t s = sbox[v];
        uint8_t u = inv_sbox[v];
        te[0][v] = column(gf_mul(s, 2), s, s, gf_mul(s, 3));
        td[0][v] = column(gf_mul(u, 14), gf_mul(u, 9), gf_mul(u, 13), gf_mul(u, 11));
        for (i = 1; i < 4; i++) {
            te[i][v] = ror32_8(te[i - 1][v]);
            td[i][v] = ror32_8(td[i - 1][v]);
        }
    }
    tables_ready = 1;
}

static uint32_t
load32(const uint8_t *p)
{
    return column(p[0], p[1], p[2], p[3]);
}

static void
store32(uint8_t *p, uint32_t w)
{
    p[0] = (uint8_t)(w >> 24);
    p[1] = (uint8_t)(w >> 16);
    p[2] = (uint8_t)(w >> 8);
    p[3] = (uint8_t)w;
}

typedef struct {
    PyObject_HEAD
    int rounds; /* 0 until __init__ succeeded */
    uint32_t ek[MAX_WORDS];
    uint32_t dk[MAX_WORDS]; /* equivalent inverse cipher schedule */
} RijndaelObject;

static void
encrypt_words(const RijndaelObject *self, uint32_t s[4])
{
    const uint32_t *rk = self->ek;
    uint32_t s0 = s[0] ^ rk[0], s1 = s[1] ^ rk[1], s2 = s[2] ^ rk[2], s3 = s[3] ^ rk[3];
    uint32_t t0, t1, t2, t3;
    int r;

    for (r = 1; r < self->rounds; r++) {
        rk += 4;
        t0 = te[0][s0 >> 24] ^ te[1][(s1 >> 16) & 255] ^ te[2][(s2 >> 8) & 255] ^
             te[3][s3 & 255] ^ rk[0];
        t1 = te[0][s1 >> 24] ^ te[1][(s2 >> 16) & 255] ^ te[2][(s3 >> 8) & 255] ^
             te[3][s0 & 255] ^ rk[1];
        t2 = te[0][s2 >> 24] ^ te[1][(s3 >> 16) & 255] ^ te[2][(s0 >> 8) & 255] ^
             te[3][s1 & 255] ^ rk[2];
        t3 = te[0][s3 >> 24] ^ te[1][(s0 >> 16) & 255] ^ te[2][(s1 >> 8) & 255] ^
             te[3][s2 & 255] ^ rk[3];
        s0 = t0;
        s1 = t1;
        s2 = t2;
        s3 = t3;
    }
    rk += 4;
    s[0] = column(sbox[s0 >> 24], sbox[(s1 >> 16) & 255], sbox[(s2 >> 8) & 255],
                  sbox[s3 & 255]) ^ rk[0];
    s[1] = column(sbox[s1 >> 24], sbox[(s2 >> 16) & 255], sbox[(s3 >> 8) & 255],
                  sbox[s0 & 255]) ^ rk[1];
    s[2] = column(sbox[s2 >> 24], sbox[(s3 >> 16) & 255], sbox[(s0 >> 8) & 255],
                  sbox[s1 & 255]) ^ rk[2];
    s[3] = column(sbox[s3 >> 24], sbox[(s0 >> 16) & 255], sbox[(s1 >> 8) & 255],
                  sbox[s2 & 255]) ^ rk[3];
}

static void
decrypt_words(const RijndaelObject *self, uint32_t s[4])
{
    const uint32_t *rk = self->dk;
    uint32_t s0 = s[0] ^ rk[0], s1 = s[1] ^ rk[1], s2 = s[2] ^ rk[2], s3 = s[3] ^ rk[3];
    uint32_t t0, t1, t2, t3;
    int r;

    for (r = 1; r < self->rounds; r++) {
        rk += 4;
        t0 = td[0][s0 >> 24] ^ td[1][(s3 >> 16) & 255] ^ td[2][(s2 >> 8) & 255] ^
             td[3][s1 & 255] ^ rk[0];
        t1 = td[0][s1 >> 24] ^ td[1][(s0 >> 16) & 255] ^ td[2][(s3 >> 8) & 255] ^
             td[3][s2 & 255] ^ rk[1];
        t2 = td[0][s2 >> 24] ^ td[1][(s1 >> 16) & 255] ^ td[2][(s0 >> 8) & 255] ^
             td[3][s3 & 255] ^ rk[2];
        t3 = td[0][s3 >> 24] ^ td[1][(s2 >> 16) & 255] ^ td[2][(s1 >> 8) & 255] ^
             td[3][s0 & 255] ^ rk[3];
        s0 = t0;
        s1 = t1;
        s2 = t2;
        s3 = t3;
    }
    rk += 4;
    s[0] = column(inv_sbox[s0 >> 24], inv_sbox[(s3 >> 16) & 255], inv_sbox[(s2 >> 8) & 255],
                  inv_sbox[s1 & 255]) ^ rk[0];
    s[1] = column(inv_sbox[s1 >> 24], inv_sbox[(s0 >> 16) & 255], inv_sbox[(s3 >> 8) & 255],
                  inv_sbox[s2 & 255]) ^ rk[1];
    s[2] = column(inv_sbox[s2 >> 24], inv_sbox[(s1 >> 16) & 255], inv_sbox[(s0 >> 8) & 255],
                  inv_sbox[s3 & 255]) ^ rk[2];
    s[3] = column(inv_sbox[s3 >> 24], inv_sbox[(s2 >> 16) & 255], inv_sbox[(s1 >> 8) & 255],
                  inv_sbox[s0 & 255]) ^ rk[3];
}

static void
load_block(uint32_t s[4], const uint8_t *p)
{
    s[0] = load32(p);
    s[1] = load32(p + 4);
    s[2] = load32(p + 8);
    s[3] = load32(p + 12);
}

static void
store_block(uint8_t *p, const uint32_t s[4])
{
    store32(p, s[0]);
    store32(p + 4, s[1]);
    store32(p + 8, s[2]);
    store32(p + 12, s[3]);
}

/* InvMixColumns of one round-key word, through the tables (td already holds InvSubBytes). */
static uint32_t
inv_mix(uint32_t w)
{
    return td[0][sbox[w >> 24]] ^ td[1][sbox[(w >> 16) & 255]] ^ td[2][sbox[(w >> 8) & 255]] ^
           td[3][sbox[w & 255]];
}

/* ---- argument helpers ---------------------------------------------------------------- */

static int
get_bytes(PyObject *obj, Py_buffer *view)
{
    return PyObject_GetBuffer(obj, view, PyBUF_SIMPLE);
}

static int
check_ready(RijndaelObject *self)
{
    if (self->rounds == 0) {
        PyErr_SetString(PyExc_RuntimeError, "Rijndael object was not initialised");
        return -1;
    }
    return 0;
}

static int
check_block(const Py_buffer *view, const char *what)
{
    if (view->len != BLOCK) {
        PyErr_Format(PyExc_ValueError, "%s must be %d bytes, got %zd", what, BLOCK, view->len);
        return -1;
    }
    return 0;
}

static int
check_blocks(const Py_buffer *view)
{
    if (view->len % BLOCK) {
        PyErr_Format(PyExc_ValueError, "data length %zd is not a multiple of %d", view->len,
                     BLOCK);
        return -1;
    }
    return 0;
}

static int
check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t expected)
{
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly %zd argument%s (%zd given)", name,
                     expected, expected == 1 ? "" : "s", nargs);
        return -1;
    }
    return 0;
}

/* ---- type ---------------------------------------------------------------------------- */

static int
Rijndael_init(PyObject *op, PyObject *args, PyObject *kwargs)
{
    RijndaelObject *self = (RijndaelObject *)op;
    static char *keywords[] = {"schedule", NULL};
    Py_buffer view;
    const uint8_t *p;
    int rounds, r, i;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*:Rijndael", keywords, &view)) {
        return -1;
    }
    if (view.len % BLOCK || view.len / BLOCK < MIN_ROUNDS + 1 ||
        view.len / BLOCK > MAX_ROUNDS + 1) {
        PyErr_Format(PyExc_ValueError,
                     "key schedule must be 16 * (rounds + 1) bytes with %d <= rounds <= %d, "
                     "got %zd bytes",
                     MIN_ROUNDS, MAX_ROUNDS, view.len);
        PyBuffer_Release(&view);
        return -1;
    }
    rounds = (int)(view.len / BLOCK) - 1;
    p = (const uint8_t *)view.buf;
    for (i = 0; i < 4 * (rounds + 1); i++) {
        self->ek[i] = load32(p + 4 * i);
    }
    PyBuffer_Release(&view);
    /* Equivalent inverse cipher: round keys in reverse, InvMixColumns on the inner ones. */
    for (r = 0; r <= rounds; r++) {
        const uint32_t *src = self->ek + 4 * (rounds - r);
        for (i = 0; i < 4; i++) {
            self->dk[4 * r + i] = (r == 0 || r == rounds) ? src[i] : inv_mix(src[i]);
        }
    }
    self->rounds = rounds;
    return 0;
}

static void
Rijndael_dealloc(PyObject *op)
{
    PyTypeObject *tp = Py_TYPE(op);
    tp->tp_free(op);
    Py_DECREF(tp);
}

static PyObject *
Rijndael_get_rounds(PyObject *op, void *closure)
{
    (void)closure;
    return PyLong_FromLong(((RijndaelObject *)op)->rounds);
}

/* One block, encrypt (decrypt = 0) or decrypt (decrypt = 1). */
static PyObject *
one_block(RijndaelObject *self, PyObject *const *args, Py_ssize_t nargs, const char *name,
          int decrypt)
{
    Py_buffer in;
    PyObject *out;
    uint32_t s[4];

    if (check_nargs(name, nargs, 1) || check_ready(self) || get_bytes(args[0], &in)) {
        return NULL;
    }
    if (check_block(&in, "block")) {
        PyBuffer_Release(&in);
        return NULL;
    }
    load_block(s, (const uint8_t *)in.buf);
    PyBuffer_Release(&in);
    if (decrypt) {
        decrypt_words(self, s);
    }
    else {
        encrypt_words(self, s);
    }
    out = PyBytes_FromStringAndSize(NULL, BLOCK);
    if (out != NULL) {
        store_block((uint8_t *)PyBytes_AS_STRING(out), s);
    }
    return out;
}

static PyObject *
Rijndael_encrypt_block(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    return one_block((RijndaelObject *)op, args, nargs, "encrypt_block", 0);
}

static PyObject *
Rijndael_decrypt_block(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    return one_block((RijndaelObject *)op, args, nargs, "decrypt_block", 1);
}

/* Acquires iv (if wanted) and data, checks their lengths and allocates the output. */
static int
cbc_args(RijndaelObject *self, PyObject *const *args, Py_ssize_t nargs, const char *name,
         int with_iv, Py_buffer *iv, Py_buffer *data)
{
    if (check_nargs(name, nargs, with_iv ? 2 : 1) || check_ready(self)) {
        return -1;
    }
    if (with_iv) {
        if (get_bytes(args[0], iv)) {
            return -1;
        }
        if (check_block(iv, "iv")) {
            PyBuffer_Release(iv);
            return -1;
        }
    }
    if (get_bytes(args[with_iv ? 1 : 0], data)) {
        if (with_iv) {
            PyBuffer_Release(iv);
        }
        return -1;
    }
    if (check_blocks(data)) {
        PyBuffer_Release(data);
        if (with_iv) {
            PyBuffer_Release(iv);
        }
        return -1;
    }
    return 0;
}

static PyObject *
Rijndael_cbc_encrypt(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    RijndaelObject *self = (RijndaelObject *)op;
    Py_buffer iv, data;
    PyObject *out;
    const uint8_t *in;
    uint8_t *dst;
    uint32_t s[4];
    Py_ssize_t off;

    if (cbc_args(self, args, nargs, "cbc_encrypt", 1, &iv, &data)) {
        return NULL;
    }
    out = PyBytes_FromStringAndSize(NULL, data.len);
    if (out != NULL) {
        in = (const uint8_t *)data.buf;
        dst = (uint8_t *)PyBytes_AS_STRING(out);
        load_block(s, (const uint8_t *)iv.buf);
        for (off = 0; off < data.len; off += BLOCK) {
            s[0] ^= load32(in + off);
            s[1] ^= load32(in + off + 4);
            s[2] ^= load32(in + off + 8);
            s[3] ^= load32(in + off + 12);
            encrypt_words(self, s);
            store_block(dst + off, s);
        }
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&iv);
    return out;
}

static PyObject *
Rijndael_cbc_decrypt(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    RijndaelObject *self = (RijndaelObject *)op;
    Py_buffer iv, data;
    PyObject *out;
    const uint8_t *in;
    uint8_t *dst;
    uint32_t s[4], prev[4], next[4];
    Py_ssize_t off;

    if (cbc_args(self, args, nargs, "cbc_decrypt", 1, &iv, &data)) {
        return NULL;
    }
    out = PyBytes_FromStringAndSize(NULL, data.len);
    if (out != NULL) {
        in = (const uint8_t *)data.buf;
        dst = (uint8_t *)PyBytes_AS_STRING(out);
        load_block(prev, (const uint8_t *)iv.buf);
        for (off = 0; off < data.len; off += BLOCK) {
            load_block(next, in + off);
            memcpy(s, next, sizeof s);
            decrypt_words(self, s);
            s[0] ^= prev[0];
            s[1] ^= prev[1];
            s[2] ^= prev[2];
            s[3] ^= prev[3];
            store_block(dst + off, s);
            memcpy(prev, next, sizeof prev);
        }
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&iv);
    return out;
}

static PyObject *
Rijndael_cbc_mac(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    RijndaelObject *self = (RijndaelObject *)op;
    Py_buffer data;
    PyObject *out;
    const uint8_t *in;
    uint32_t s[4] = {0, 0, 0, 0};
    Py_ssize_t off;

    if (cbc_args(self, args, nargs, "cbc_mac", 0, NULL, &data)) {
        return NULL;
    }
    in = (const uint8_t *)data.buf;
    for (off = 0; off < data.len; off += BLOCK) {
        s[0] ^= load32(in + off);
        s[1] ^= load32(in + off + 4);
        s[2] ^= load32(in + off + 8);
        s[3] ^= load32(in + off + 12);
        encrypt_words(self, s);
    }
    PyBuffer_Release(&data);
    out = PyBytes_FromStringAndSize(NULL, BLOCK);
    if (out != NULL) {
        store_block((uint8_t *)PyBytes_AS_STRING(out), s);
    }
    return out;
}

static PyMethodDef Rijndael_methods[] = {
    {"encrypt_block", (PyCFunction)(void (*)(void))Rijndael_encrypt_block, METH_FASTCALL,
     PyDoc_STR("encrypt_block(block, /)\n--\n\nEncrypt one 16-byte block.")},
    {"decrypt_block", (PyCFunction)(void (*)(void))Rijndael_decrypt_block, METH_FASTCALL,
     PyDoc_STR("decrypt_block(block, /)\n--\n\nDecrypt one 16-byte block.")},
    {"cbc_encrypt", (PyCFunction)(void (*)(void))Rijndael_cbc_encrypt, METH_FASTCALL,
     PyDoc_STR("cbc_encrypt(iv, data, /)\n--\n\nCBC-encrypt whole blocks, no padding.")},
    {"cbc_decrypt", (PyCFunction)(void (*)(void))Rijndael_cbc_decrypt, METH_FASTCALL,
     PyDoc_STR("cbc_decrypt(iv, data, /)\n--\n\nCBC-decrypt whole blocks, no unpadding.")},
    {"cbc_mac", (PyCFunction)(void (*)(void))Rijndael_cbc_mac, METH_FASTCALL,
     PyDoc_STR("cbc_mac(data, /)\n--\n\nCBC-MAC with a zero IV over whole blocks.")},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Rijndael_getset[] = {
    {"rounds", Rijndael_get_rounds, NULL, PyDoc_STR("number of rounds (Nr)"), NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Rijndael_slots[] = {
    {Py_tp_doc, (void *)PyDoc_STR(
                    "Rijndael(schedule)\n--\n\n"
                    "Rijndael with a 128-bit block over an expanded key schedule of\n"
                    "16 * (rounds + 1) bytes (big-endian words, as crypto.expand_key).")},
    {Py_tp_init, (void *)Rijndael_init},
    {Py_tp_new, (void *)PyType_GenericNew},
    {Py_tp_dealloc, (void *)Rijndael_dealloc},
    {Py_tp_methods, Rijndael_methods},
    {Py_tp_getset, Rijndael_getset},
    {0, NULL},
};

static PyType_Spec Rijndael_spec = {
    .name = "kmsd.protocol._rijndael.Rijndael",
    .basicsize = sizeof(RijndaelObject),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = Rijndael_slots,
};

/* ---- module -------------------------------------------------------------------------- */

static int
module_exec(PyObject *module)
{
    PyObject *type;

    build_tables();
    type = PyType_FromModuleAndSpec(module, &Rijndael_spec, NULL);
    if (type == NULL) {
        return -1;
    }
    if (PyModule_AddObject(module, "Rijndael", type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, (void *)module_exec},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kmsd.protocol._rijndael",
    .m_doc = PyDoc_STR("Compiled Rijndael for kmsd.protocol.crypto (see PyRijndael)."),
    .m_size = 0,
    .m_slots = module_slots,
};

PyMODINIT_FUNC
PyInit__rijndael(void)
{
    return PyModuleDef_Init(&module_def);
}
