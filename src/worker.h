/* A background thread for the work that must stay off the event loop:
 * RSA/AES decryption of new secrets and fsync of the batch's files. The
 * multi transport owns one; completions come back through multi:wait(). */
#ifndef ENOS_WORKER_H
#define ENOS_WORKER_H

#include <pthread.h>
#include "enos.h"
#include "secret.h"

enum { ENOS_JOB_DECRYPT = 1, ENOS_JOB_FSYNC = 2 };

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
