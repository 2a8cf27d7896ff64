/* SPDX-License-Identifier: GPL-2.0-or-later */
/* Stand-in for QEMU's crypto/hash.h: SHA-256 as a hex string, through GLib (hbitmap_sha256). */
#ifndef STANDIN_CRYPTO_HASH_H
#define STANDIN_CRYPTO_HASH_H
#define QCRYPTO_HASH_ALGO_SHA256 0 /* QEMU 9.2 and later */
#define QCRYPTO_HASH_ALG_SHA256 0  /* before */
static inline int qcrypto_hash_digest(int alg, const char *buf, size_t len, char **digest,
                                      Error **errp)
{
    (void)alg;
    (void)errp;
    *digest = g_compute_checksum_for_data(G_CHECKSUM_SHA256, (const guchar *)buf, len);
    return 0;
}
#endif
