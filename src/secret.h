/* Decryption of a replace's new secret (RSA-unwrapped AES key, then AES), shared by secret.c (in the Lua
 * thread) and the worker thread (worker.c runs it off the event loop). */
#ifndef ENOS_SECRET_H
#define ENOS_SECRET_H

#include <openssl/evp.h>
#include "enos.h"

/* One decryption's inputs (owned copies; the key is reference-counted). */
typedef struct {
  EVP_PKEY *pkey;
  char *sk, *ds;
  size_t skn, dsn;
  int pad, mode, kf, enc;
} enos_decrypt_args;

/* Reads (key, sessionKey, deviceSecret, pad, mode, kf, enc) at idx..idx+6 (raises on misuse). */
void enos_decrypt_read_args(lua_State *L, int idx, enos_decrypt_args *a);
/* Runs in any thread; NULL and *out (free with enos_free_secret) or an error message. */
const char *enos_decrypt_run(const enos_decrypt_args *a, unsigned char **out, size_t *outn);
void enos_decrypt_args_free(enos_decrypt_args *a);

#endif
