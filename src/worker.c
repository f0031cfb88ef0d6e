/* The worker thread: see worker.h. One thread, jobs in FIFO order (so a
 * credentials fsync queued before the journal's finishes first). */
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>
#include "worker.h"

void enos_job_free(enos_job *j) {
  if (j == NULL) return;
  if (j->kind == ENOS_JOB_DECRYPT) enos_decrypt_args_free(&j->d);
  if (j->fd >= 0) close(j->fd);
  if (j->out) enos_free_secret(j->out, j->outn ? j->outn : 1);
  free(j);
}

static void run_job(enos_job *j) {
  if (j->kind == ENOS_JOB_DECRYPT) {
    j->err = enos_decrypt_run(&j->d, &j->out, &j->outn);
    enos_decrypt_args_free(&j->d);            /* the inputs are not needed any more */
  } else if (j->kind == ENOS_JOB_FSYNC) {
    if (fsync(j->fd) != 0) { j->sys_errno = errno; j->err = "fsync failed"; }
    close(j->fd);
    j->fd = -1;
  } else {
    j->err = "unknown job";
  }
}

static void *worker_main(void *ud) {
  enos_worker *w = ud;
  pthread_mutex_lock(&w->mu);
  for (;;) {
    enos_job *j;
    while (w->queue == NULL && !w->stop) pthread_cond_wait(&w->cv, &w->mu);
    if (w->stop) break;
    j = w->queue;
    w->queue = j->next;
    if (w->queue == NULL) w->queue_tail = NULL;
    j->next = NULL;
    pthread_mutex_unlock(&w->mu);
    run_job(j);
    pthread_mutex_lock(&w->mu);
    if (w->done_tail) w->done_tail->next = j; else w->done = j;
    w->done_tail = j;
    if (w->wake) w->wake(w->wake_ud);
  }
  pthread_mutex_unlock(&w->mu);
  return NULL;
}

const char *enos_worker_init(enos_worker *w, void (*wake)(void *), void *ud) {
  memset(w, 0, sizeof *w);
  if (pthread_mutex_init(&w->mu, NULL) != 0) return "pthread_mutex_init failed";
  if (pthread_cond_init(&w->cv, NULL) != 0) {
    pthread_mutex_destroy(&w->mu);
    return "pthread_cond_init failed";
  }
  w->wake = wake;
  w->wake_ud = ud;
  w->inited = 1;
  return NULL;
}

const char *enos_worker_submit(enos_worker *w, enos_job *j) {
  if (!w->inited) return "worker is not set up";
  pthread_mutex_lock(&w->mu);
  if (!w->started) {
    if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
      pthread_mutex_unlock(&w->mu);
      return "cannot start the worker thread";
    }
    w->started = 1;
  }
  j->next = NULL;
  if (w->queue_tail) w->queue_tail->next = j; else w->queue = j;
  w->queue_tail = j;
  pthread_cond_signal(&w->cv);
  pthread_mutex_unlock(&w->mu);
  return NULL;
}

enos_job *enos_worker_take(enos_worker *w) {
  enos_job *list;
  if (!w->inited) return NULL;
  pthread_mutex_lock(&w->mu);
  list = w->done;
  w->done = w->done_tail = NULL;
  pthread_mutex_unlock(&w->mu);
  return list;
}

int enos_worker_has_done(enos_worker *w) {
  int has;
  if (!w->inited) return 0;
  pthread_mutex_lock(&w->mu);
  has = w->done != NULL;
  pthread_mutex_unlock(&w->mu);
  return has;
}

static void free_list(enos_job *j) {
  while (j) {
    enos_job *next = j->next;
    enos_job_free(j);
    j = next;
  }
}

void enos_worker_close(enos_worker *w) {
  if (!w->inited) return;
  pthread_mutex_lock(&w->mu);
  w->stop = 1;
  pthread_cond_signal(&w->cv);
  pthread_mutex_unlock(&w->mu);
  if (w->started) pthread_join(w->thread, NULL);   /* finishes the job it is running */
  free_list(w->queue);
  free_list(w->done);
  w->queue = w->queue_tail = w->done = w->done_tail = NULL;
  pthread_cond_destroy(&w->cv);
  pthread_mutex_destroy(&w->mu);
  w->inited = 0;
}
