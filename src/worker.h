/* A background thread for the work that must stay off the event loop:
 * RSA/AES decryption of new secrets and fsync of the batch's files. The
 * multi transport owns one; completions come back through multi:wait(). */
#ifndef ENOS_WORKER_H
#define ENOS_WORKER_H

#include <pthread.h>
#include <openssl/evp.h>
#include "enos.h"

enum { ENOS_JOB_DECRYPT = 1, ENOS_JOB_FSYNC = 2 };

/* One decryption's inputs (owned copies; the key is reference-counted). */
typedef struct {
  EVP_PKEY *pkey;
  char *sk, *ds;
  size_t skn, dsn;
  int pad, mode, kf, enc;
} enos_decrypt_args;

typedef struct enos_job {
  lua_Integer id;
  int kind;
  enos_decrypt_args d;          /* ENOS_JOB_DECRYPT */
  int fd;                       /* ENOS_JOB_FSYNC: a dup() of the file's descriptor */
  const char *err;              /* result: NULL or a static message */
  int sys_errno;
  unsigned char *out;           /* decrypted secret (cleansed when freed) */
  size_t outn;
  struct enos_job *next;
} enos_job;

typedef struct {
  pthread_t thread;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int started, stop, inited;
  enos_job *queue, *queue_tail;  /* waiting to run */
  enos_job *done, *done_tail;    /* finished, not yet collected */
  void (*wake)(void *);         /* called (from the worker thread) when a job finishes */
  void *wake_ud;
} enos_worker;

/* secret.c: reads (key, sessionKey, deviceSecret, pad, mode, kf, enc) at idx..idx+6 (raises on misuse). */
void enos_decrypt_read_args(lua_State *L, int idx, enos_decrypt_args *a);
/* secret.c: runs in any thread; NULL and *out (free with enos_free_secret) or an error message. */
const char *enos_decrypt_run(const enos_decrypt_args *a, unsigned char **out, size_t *outn);
void enos_decrypt_args_free(enos_decrypt_args *a);

/* file.c: the descriptor of the enos.file at idx (raises when closed). */
int enos_file_fd(lua_State *L, int idx);

/* Returns NULL, or why the worker could not be set up. wake(ud) must be thread-safe and never lose a
 * wake-up (it wakes the event loop's next wait). */
const char *enos_worker_init(enos_worker *w, void (*wake)(void *), void *ud);
/* Queues j (the worker owns it from now on); starts the thread on first use. NULL or an error. */
const char *enos_worker_submit(enos_worker *w, enos_job *j);
/* Detaches and returns the finished jobs (a list through ->next, in completion order). */
enos_job *enos_worker_take(enos_worker *w);
/* True when finished jobs wait to be collected. */
int enos_worker_has_done(enos_worker *w);
/* Stops and joins the thread; frees every job not collected. */
void enos_worker_close(enos_worker *w);
void enos_job_free(enos_job *j);

#endif
